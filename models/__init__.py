"""Model families of this project, registered in timm's registry on import.

    import timm, models
    model = timm.create_model("deit_small_patch16_shrink_base", base_keep_rate=0.7)

Every module of this package is imported here, so a method family that is one new file
under `models/` registers its models and its family declaration with no other edit.
"""
import importlib as _importlib
import pkgutil as _pkgutil

for _module in sorted(_info.name for _info in _pkgutil.iter_modules(__path__)):
    _importlib.import_module(f"{__name__}.{_module}")

from .hooks import MethodHooks  # noqa: E402,F401
