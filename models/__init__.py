"""Model families of this project, registered in timm's registry on import.

    import timm, models
    model = timm.create_model("deit_small_patch16_shrink_base", base_keep_rate=0.7)
"""
from . import dwnet, evit, ltm, ltmp, raftmlp, shrink, tofu, tome  # noqa: F401  (registration side effects)
from .hooks import TrainingHooks, build_training_hooks  # noqa: F401
