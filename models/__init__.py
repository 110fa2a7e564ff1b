"""Model families of this project, registered in timm's registry on import.

    import timm, models
    model = timm.create_model("deit_small_patch16_shrink_base", base_keep_rate=0.7)
"""
from . import dwnet, evit, ltm, ltmp, raftmlp, shrink, tofu, tome  # noqa: F401  (registration side effects)
from . import family  # noqa: F401  (the method-family registry)
from .hooks import TrainingHooks  # noqa: F401
