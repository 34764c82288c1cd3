"""The wheel installs every subpackage under mxmoe_jax and nothing else at the top level."""

import tomllib

from conftest import REPO


def _declared():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(meta["packages"]), meta["package-dir"]


def test_every_package_folder_is_declared():
    declared, package_dir = _declared()
    found = set()
    for top, mapped in (("mxmoe_jax", "mxmoe_jax"), ("kernels", "mxmoe_jax.kernels"),
                        ("convert", "mxmoe_jax.convert")):
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top).parts
            found.add(".".join((mapped, *rel)))
    assert found == declared
    assert all(p == "mxmoe_jax" or p.startswith("mxmoe_jax.") for p in declared)
    assert package_dir["mxmoe_jax.kernels"] == "kernels"
    assert package_dir["mxmoe_jax.convert"] == "convert"


def test_checkout_folders_import_under_the_namespace():
    import mxmoe_jax.convert
    import mxmoe_jax.kernels.pallas

    assert mxmoe_jax.kernels.pallas.__file__.startswith(str(REPO / "kernels"))
    assert mxmoe_jax.convert.__file__.startswith(str(REPO / "convert"))
