import sys

from mxmoe_jax.cli import main

sys.exit(main())
