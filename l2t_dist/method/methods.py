"""The transfer methods, one small class each, and their registry (importable without torch).

A method declares what it needs as class attributes, which the job schema (`l2t_dist.config`,
torch-free) and `build_trainee` read, and gives its part of each batch's losses through three
hooks that `TransferObjective` calls:

- `prepare(obj, batch, source_feats)`: per batch, fill the `Batch` fields its losses use
  (`batch.raw_sources`, the pairs' source maps, are already there);
- `transfer_loss(obj, batch, logits, maps, head)`: L_transfer of the real step (φ constant),
  from the student's outputs (see `TransferStudent.forward`);
- `inner(obj, batch)`: for methods with meta-networks, the look-ahead's β-scaled inner objective.

Torch is imported inside the hooks, never at module level: the schema and `l2t-dist --help`
must stay light. Adding a method is one decorated class here plus its test.
"""

from __future__ import annotations

from typing import ClassVar, Optional

from l2t_dist.errors import ConfigError

REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: the class's `name` becomes a valid `method.name` (in definition order)."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_method(method: "str | Method") -> "Method":
    """The method object for a name (a `Method` passes through); unknown names list the allowed ones."""
    if isinstance(method, Method):
        return method
    if method not in REGISTRY:
        raise ConfigError(f"unknown method {method!r}; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[method]()


class Method:
    """A transfer method: its needs (class attributes) and its losses (hooks). Stateless."""

    name: ClassVar[str]
    needs_sources: ClassVar[bool] = True        # the job must list at least one source
    takes_sources: ClassVar[bool] = True        # False: a job that lists sources is refused (they would be
                                                # loaded, and served by Ray actors, for nothing)
    needs_target_checkpoint: ClassVar[bool] = False  # the target must start from target.checkpoint
    single_source: ClassVar[bool] = False       # ... and exactly one
    source_logits: ClassVar[bool] = False       # the source computes its logits too
    extra_head: ClassVar[bool] = False          # the student gets an extra linear head on its embedding (LwF)
    default_pairs: ClassVar[Optional[str]] = None  # pair preset when the job names none; None: no pairs
    regressors: ClassVar[bool] = False          # one 1x1-conv regressor per pair (part of θ)
    meta_networks: ClassVar[tuple[str, ...]] = ()  # φ per pair: () none, ("what",), ("what", "where")

    @property
    def uses_pairs(self) -> bool:
        """A method that matches (source tap, target tap) pairs has a preset for them."""
        return self.default_pairs is not None

    def prepare(self, obj, batch, source_feats) -> None:
        """Fill the batch fields this method's losses read."""

    def transfer_loss(self, obj, batch, logits, maps, head):
        raise NotImplementedError

    def inner(self, obj, batch):
        raise NotImplementedError(f"method {self.name!r} has no look-ahead")

    def __repr__(self) -> str:
        return f"<method {self.name}>"


@register
class Scratch(Method):
    """The target alone: cross-entropy, no transfer term."""

    name = "scratch"
    needs_sources = False

    def transfer_loss(self, obj, batch, logits, maps, head):
        return logits.new_zeros(())


@register
class Finetune(Scratch):
    """The practitioner's first baseline: the target starts from a pretrained checkpoint of its
    own architecture (`target.checkpoint`, a new classifier head for the task's classes) and
    trains like scratch: cross-entropy, the plain step, no source. Listed sources are refused
    rather than ignored: they would be read (and served) for nothing."""

    name = "finetune"
    takes_sources = False
    needs_target_checkpoint = True


@register
class LwF(Method):
    """Learning without forgetting: an extra head on the target mimics the source's softmax (KD)."""

    name = "lwf"
    single_source = True
    source_logits = True
    extra_head = True

    def prepare(self, obj, batch, source_feats) -> None:
        from l2t_dist.errors import TrainingError
        from l2t_dist.method.losses import teacher_probs

        name = obj.lwf_source or (next(iter(source_feats)) if len(source_feats) == 1 else None)
        if name is None or "logits" not in source_feats.get(name, {}):
            raise TrainingError(f"method 'lwf' needs the logits of source {name or '(the only one)'} "
                                f"(source features {{name: {{'logits': ...}}}}); got sources {list(source_feats)}")
        batch.teacher = teacher_probs(source_feats[name]["logits"].to(obj.dtype))

    def transfer_loss(self, obj, batch, logits, maps, head):
        from l2t_dist.method.losses import kd_loss

        return kd_loss(head, batch.teacher)


@register
class AT(Method):
    """Attention transfer on the raw target maps (no regressors), one-to-one pairs."""

    name = "at"
    default_pairs = "one_to_one"

    def prepare(self, obj, batch, source_feats) -> None:
        batch.sources = list(batch.raw_sources)

    def transfer_loss(self, obj, batch, logits, maps, head):
        from l2t_dist.method.losses import at_loss

        return at_loss(maps, batch.sources)


class _Matching(Method):
    """Feature matching through regressors, per group of pairs sharing a target tap.

    The weights are FM's constant 1/(B·C) without meta-networks, else the meta-networks'
    (1/B)·λ·w with their graph to φ (the look-ahead's factored inner objective).
    """

    regressors = True

    def prepare(self, obj, batch, source_feats) -> None:
        from l2t_dist.method.losses import fm_weights
        from l2t_dist.method.transfer import cat_channels, pool, resize_to

        pairs, groups, raw = obj.student.pairs, obj.student.groups, batch.raw_sources
        batch.sources = [cat_channels([resize_to(raw[i], pairs[i].target_size) for i in g]) for g in groups]
        if obj.meta is not None:
            pooled: dict = {}   # one pool per source tap, shared by its pairs
            for p, s in zip(pairs, raw):
                if (p.source, p.source_tap) not in pooled:
                    pooled[(p.source, p.source_tap)] = pool(s)
            weights, batch.lams = obj.meta([pooled[(p.source, p.source_tap)] for p in pairs])
        else:
            weights = [fm_weights(batch.x.shape[0], p.source_channels, batch.x) for p in pairs]
        batch.weights = [cat_channels([weights[i] for i in g]) for g in groups]

    def transfer_loss(self, obj, batch, logits, maps, head):
        from l2t_dist.method.transfer import matching_terms, weighted_matching_loss

        return weighted_matching_loss(matching_terms(maps, _sources_for(obj, batch, maps)),
                                      [w.detach() for w in batch.weights])

    def inner(self, obj, batch):
        from l2t_dist.bilevel import FactoredObjective
        from l2t_dist.method.transfer import matching_terms

        x = batch.x

        def terms(params):
            _, maps, _ = obj.functional(params, x, logits=False, maps=True)
            return matching_terms(maps, _sources_for(obj, batch, maps))

        return FactoredObjective(terms, [obj.beta * w for w in batch.weights])


def _sources_for(obj, batch, maps) -> list:
    """The grouped source maps, resized in `prepare`; redone only when the input size differs
    from the one the pairs were built for."""
    from l2t_dist.method.transfer import cat_channels, resize_to

    out = []
    for s, m, group in zip(batch.sources, maps, obj.student.groups):
        if s.shape[-2:] != m.shape[-2:]:
            s = cat_channels([resize_to(batch.raw_sources[i], m.shape[-2:]) for i in group])
        out.append(s)
    return out


@register
class FM(_Matching):
    """FitNets-style feature matching: λ = 1, w = 1/C, on the single deepest pair by default."""

    name = "fm"
    default_pairs = "single"


@register
class L2TW(_Matching):
    """L2T-w: the what-network learns channel weights (λ = 1), on one-to-one pairs."""

    name = "l2t_w"
    default_pairs = "one_to_one"
    meta_networks = ("what",)


@register
class L2TWW(_Matching):
    """L2T-ww: what- and where-networks, on all-to-all pairs."""

    name = "l2t_ww"
    default_pairs = "all_to_all"
    meta_networks = ("what", "where")
