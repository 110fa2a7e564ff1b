"""The forms a model's output takes (Tensor, a distillation tuple, a dict with "logits")."""


def main_logits(outputs):
    """The classification logits of any model output form."""
    if isinstance(outputs, dict):
        outputs = outputs["logits"]
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    return outputs
