"""The target's starting weights from a pretrained checkpoint (`target.checkpoint`): every key
of the checkpoint must fit the target, except the classifier head, which stays freshly
initialised with the task's classes (method `finetune`, and any method that sets the key).

The checkpoint is read by the source loader's own reader (sources/zoo.py: weights_only unless
`target.allow_unsafe_pickle`, every recognised format) and loaded as strictly: a target that
silently half-loads is a scratch run under another name.
"""

from __future__ import annotations

import torch
from torch import nn

from l2t_dist.errors import CheckpointError


def classifier_keys(model: nn.Module, arch: str) -> list[str]:
    """The state_dict keys whose shape follows the number of classes: the classifier head
    (`fc`, `linear`, `classifier`, timm's `head.fc`, Inception's aux heads, ...). Found by
    building `arch` once more with one more class, so no architecture has to name its head;
    the caller's random-number state is left as it was."""
    from l2t_dist.models import build_model

    with torch.random.fork_rng(devices=[]):
        other = build_model(arch, int(model.num_classes) + 1).state_dict()
    return [k for k, v in model.state_dict().items() if k in other and other[k].shape != v.shape]


def load_target_checkpoint(model: nn.Module, arch: str, path: str, allow_unsafe_pickle: bool = False) -> list[str]:
    """Load `path` into the freshly built target `model` of `arch`, all but its classifier head
    (the checkpoint's head, whatever its classes, is dropped; it may also be absent). Returns
    the head's keys. A checkpoint that does not fit raises the project's key-by-key listing."""
    from l2t_dist.sources.zoo import FORMAT, load_state_strict, read_checkpoint

    sd, meta = read_checkpoint(path, allow_unsafe_pickle)
    saved = meta.get("arch") if meta.get("format") == FORMAT else None
    where = f"target.checkpoint {str(path)!r}"
    if saved and saved != arch:
        raise CheckpointError(f"{where} was saved from arch {saved!r} but target.arch is {arch!r}; "
                              f"set target.arch={saved}")
    head = classifier_keys(model, arch)
    own = model.state_dict()
    weights = {k: v for k, v in sd.items() if k not in head}
    weights.update({k: own[k] for k in head})  # the new head keeps its fresh initialisation
    try:
        load_state_strict(model, weights, arch_setting="target.arch")
    except CheckpointError as exc:
        raise CheckpointError(f"{where} (all keys but the classifier head {', '.join(head)} must fit): {exc}") \
            from None
    return head
