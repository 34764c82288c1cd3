"""Bit allocation: the MxMoE MILP (PuLP), its exact loss/time trade-off, and qconfig.json.

``milp`` is the pure math; ``problem`` turns trace.json + loss.json + perf.json into MILP units;
``solve`` runs it per layer or per model; ``qconfig`` reads and writes the result (ours and the
original MxMoE schema) and holds ``Allocation``, the in-memory allocation; ``report`` prints and
plots it; ``cli`` is ``mxmoe-jax solve``. Import the modules themselves: this package imports
nothing, so reading an allocation never imports the solver (PuLP is absent on the GPU machine).
"""
