"""The DeOP segmenter (:class:`DeOP`; the package docstring, :mod:`zeroseg.models.deop`, describes
it), the proposal model it is built on and its semantic inference (:func:`deop_semantic_scores`).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.config import validated
from zeroseg.config.deop import DeOPConfig
from zeroseg.errors import ConfigError, DataError
from zeroseg.models import Segmenter, load_strict
from zeroseg.models.deop.decoder import ConvHeatmapDecoder, HeatmapDecoder
from zeroseg.models.deop.loss import deop_pixel_loss
from zeroseg.models.deop.severance import severance_hook
from zeroseg.models.deop.text_prompt import TextPrompt
from zeroseg.models.maskformer import MaskFormer, check_proposals_doc
from zeroseg.models.trunk import INPUT, forward_trunk, grid_additive, project
from zeroseg.optim import deop_param_groups

#: What :class:`DeOP` takes as its config: the validated schema or its dict form.
DeOPConfigLike = DeOPConfig | Mapping[str, Any]
#: A proposals artifact's ``proposals.json`` content.
Doc = Mapping[str, Any]


def build_proposal_network(doc: Mapping[str, Any], clip_model: nn.Module | None = None) -> nn.Module:
    """The proposal model described by a ``proposals.json`` document, with untrained weights
    (no backbone weights fetched: the artifact's ``weights.pt`` replaces them).

    A ``clip`` backbone is built on ``clip_model``'s image tower when its tensors have the shapes
    of the proposals' CLIP architecture (deep-copied by the proposal model), else on ``load_clip``
    of the proposals' ``clip`` spec.

    Raises:
        DataError: a malformed document.
        ConfigError: a bad stored config (see ``zeroseg.models.maskformer.MaskFormer``).
    """
    try:
        model_cfg = dict(doc["model"])
        num_classes = int(doc["num_classes"])
        text_dim = doc.get("text_dim")
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"the proposals document is malformed ({type(e).__name__}: {e}); expected keys model, num_classes, "
            "text_dim (a pretrain_proposals artifact's proposals.json)"
        ) from None
    visual = None
    if model_cfg.get("backbone") == "clip":
        from zeroseg.config.clip import model_config
        from zeroseg.models.clip import as_spec, load_clip

        if not doc.get("clip"):
            raise DataError("the proposals document has a clip backbone but no clip spec")
        spec = as_spec(doc["clip"])
        ours = getattr(clip_model, "visual", None)
        want = model_config(spec).get("vision_cfg") or {}
        same = (
            ours is not None
            and int(ours.class_embedding.shape[-1]) == int(want.get("width", -1))
            and len(ours.transformer.resblocks) == int(want.get("layers", -1))
            and tuple(_pair(ours.patch_size)) == _pair(want.get("patch_size", -1))
        )
        visual = ours if same else load_clip(spec).visual
    return MaskFormer(model_cfg, num_classes, text_dim, visual, load_backbone_weights=False)


def _pair(x: Any) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def check_proposals_fit(doc: Mapping[str, Any], cfg: DeOPConfig, embed_dim: int, where: str = "proposals") -> int:
    """Refuse a proposal model DeOP cannot use; returns its query count ``Q``.

    The refusals shared with ZegFormer (:func:`zeroseg.models.maskformer.check_proposals_doc`: a
    query count that disagrees with the model it describes; a ``text`` class head whose embedding
    size is not the CLIP embedding size ``D``: the head is run, though its logits are ignored), then
    DeOP's own: it pairs anchor query ``i`` with proposal ``i`` (released), so
    ``model.num_queries``, when set, must equal the proposals' query count.

    Raises:
        DataError: naming both values and what to change.
    """
    q = check_proposals_doc(doc, embed_dim, who="DeOP", where=where)
    if cfg.num_queries is not None and cfg.num_queries != q:
        raise DataError(
            f"{where} has {q} queries but train_classifier.model.num_queries is {cfg.num_queries}: DeOP pairs "
            f"anchor query i with proposal i; set model.num_queries: {q} (or null), or bind proposals trained "
            f"with {cfg.num_queries} queries"
        )
    return q


def resolve_deop_config(cfg: DeOPConfigLike | None, proposals: Doc | None = None) -> tuple[DeOPConfig, dict[str, Any]]:
    """A DeOP model config's validated hyperparameters and its proposals document.

    Args:
        cfg: a validated :class:`~zeroseg.config.deop.DeOPConfig`, or a mapping of its keys
            (validated here) that may hold ``proposals`` (``segmenter.json``'s ``"model"``).
        proposals: the proposals artifact's ``proposals.json`` content (else ``cfg["proposals"]``).

    Returns:
        ``(config, proposals)``.

    Raises:
        ConfigError: a bad key or value (naming it), or no ``proposals`` document.
    """
    if not isinstance(cfg, DeOPConfig):
        cfg = dict(cfg or {})
        proposals = cfg.pop("proposals", proposals)
    if not isinstance(proposals, Mapping):
        raise ConfigError(
            "a DeOP model config needs 'proposals' (the pretrain_proposals artifact's proposals.json "
            "content); train_classifier adds it from the bound proposals artifact"
        )
    return validated(DeOPConfig, cfg, "model"), dict(proposals)


class DeOP(Segmenter):
    """DeOP segmenter (see the module docstring).

    Args:
        clip_model: an open_clip ``CLIP`` with a ViT image tower and its text tower (both frozen,
            kept whole under ``clip``; not modified).
        cfg: a :class:`~zeroseg.config.deop.DeOPConfig`, or its dict form (validated here; it
            may hold ``"proposals"``, as ``segmenter.json``'s ``"model"`` does).
        proposals: the proposals artifact's ``proposals.json`` (``model``, ``num_classes``,
            ``text_dim``, ``num_queries``, ``input`` with ``mean`` / ``std``, ``clip``); else
            ``cfg["proposals"]``. The proposal model is built from it with random weights: load
            them with :meth:`load_proposal_weights` (a saved DeOP carries them in ``weights.pt``
            under ``proposals.``).

    Attributes: ``cfg`` (the validated :class:`~zeroseg.config.deop.DeOPConfig`) and
    ``proposals_doc`` (the ``proposals.json`` content); :meth:`config_json` stores both.

    Attributes (Segmenter contract): ``input_size``; ``mean`` / ``std``: the proposal network's
    normalisation (released: both streams get the same ImageNet-normalised tensor);
    ``size_divisibility``; ``encodes_text = True`` (:meth:`encode_text`);
    ``scores_are_probabilities = True``.

    ``forward(images [B, 3, H, W], text_embeddings [C, D]) -> [B, C, H, W]`` semantic scores in
    [0, Q] at the input size (a sum over the proposals of class probability x mask probability; not a distribution).

    Trainable: the decoder, the no-object embedding, the visual prompts and the text context
    (:meth:`learned_state_dict`); ``weights.pt`` (:meth:`trainable_names`) also holds the frozen
    proposal model under ``proposals.``.

    Raises:
        ConfigError: a bad config, no proposals document, ``width`` other than the CLIP embedding
            size, sizes that are not multiples of the patch / the proposals' divisibility,
            visual prompt layers or severance layers outside the tower.
        DataError: a proposals document that does not fit (:func:`check_proposals_fit`).
        ValueError: a non-ViT CLIP model or one without a usable text tower.
    """

    scores_are_probabilities = True
    encodes_text = True

    def __init__(self, clip_model: nn.Module, cfg: DeOPConfigLike | None = None, proposals: Doc | None = None) -> None:
        super().__init__()
        self.cfg, self.proposals_doc = resolve_deop_config(cfg, proposals)
        c, doc = self.cfg, self.proposals_doc
        if not hasattr(clip_model, "visual"):
            raise ValueError("DeOP needs a whole open_clip CLIP model (image and text towers)")
        self.clip = clip_model
        for p in self.clip.parameters():
            p.requires_grad_(False)
        visual = clip_model.visual
        from zeroseg.models.clip import check_input_size, image_norm, patch_size
        from zeroseg.models.trunk import check_trunk_visual

        check_trunk_visual(visual)
        self.embed_dim = int(visual.output_dim)
        self.patch = patch_size(visual)
        n_blocks = len(visual.transformer.resblocks)
        self.num_queries = check_proposals_fit(doc, c, self.embed_dim)

        # ---- sizes
        check_input_size(visual, c.input_size, "model.input_size")
        try:
            p_div = int(doc["model"].get("size_divisibility", 32))
            self.mean = tuple(float(v) for v in doc["input"]["mean"])
            self.std = tuple(float(v) for v in doc["input"]["std"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise DataError(
                f"the proposals document lacks model.size_divisibility / input.mean / input.std ({e})"
            ) from None
        self.divisor = math.lcm(p_div, self.patch[0], self.patch[1])
        for key, size in (("model.input_size", c.input_size), ("model.size_divisibility", (c.size_divisibility,) * 2)):
            if size[0] % self.divisor or size[1] % self.divisor:
                raise ConfigError(
                    f"{key} {list(size)} must be a multiple of {self.divisor} (the proposal network's size "
                    f"divisibility {p_div} and the CLIP patch {list(self.patch)})"
                )
        self.input_size = tuple(int(s) for s in c.input_size)
        self.size_divisibility = int(c.size_divisibility)
        self.clip_mean, self.clip_std = image_norm(clip_model)

        # ---- proposals (frozen)
        self.proposals = build_proposal_network(doc, clip_model)
        for p in self.proposals.parameters():
            p.requires_grad_(False)
        self._proposal_text_dim = doc.get("text_dim")
        self._proposal_head = doc.get("class_head") or doc["model"].get("class_head")

        # ---- severance / visual prompts
        for i in c.severance_layers:
            if not -n_blocks <= i < n_blocks:
                raise ConfigError(f"model.severance_layers: block {i} outside 0..{n_blocks - 1} (or -{n_blocks}..-1)")
        bad = [i for i in c.visual_prompt_layers if i >= n_blocks]
        if bad:
            raise ConfigError(
                f"model.visual_prompt_layers {bad} outside 0..{n_blocks - 1} (0 = the input, l = the input of block l)"
            )
        if c.visual_prompt_size % self.patch[0] or c.visual_prompt_size % self.patch[1]:
            raise ConfigError(
                f"model.visual_prompt_size {c.visual_prompt_size} must be a multiple of the CLIP patch {list(self.patch)}"
            )
        vw = int(visual.class_embedding.shape[-1])
        self.prompt_grid = (c.visual_prompt_size // self.patch[0], c.visual_prompt_size // self.patch[1])
        if c.visual_prompt_layers:
            n_pos = 1 + self.prompt_grid[0] * self.prompt_grid[1]
            # released learned_position: scale * randn with scale = width ** -0.5
            self.visual_prompts = nn.Parameter(torch.randn(len(c.visual_prompt_layers), n_pos, vw) * vw**-0.5)
        else:
            self.visual_prompts = None

        # ---- text prompts
        self.text_prompt = TextPrompt(clip_model, c.text_prompt_tokens)

        # ---- CAL decoder and classifier
        if c.decoder == "heatmap":
            if c.width != self.embed_dim:
                raise ConfigError(
                    f"model.width {c.width} must equal the CLIP embedding size {self.embed_dim}: the heatmap output "
                    "layer pools the CLIP features channel-wise per head (released: 512 for ViT-B/16)"
                )
            self.decoder = HeatmapDecoder(self.num_queries, c.width, c.heads, c.ffn, c.dropout, c.decoder_layers)
        else:
            self.decoder = ConvHeatmapDecoder(self.embed_dim, c.width, c.decoder_layers)
        # released non_object_embedding: N(0, text width ** -0.5), normalised when used
        tw = int(clip_model.token_embedding.weight.shape[1])
        self.no_object = nn.Parameter(torch.randn(1, self.embed_dim) * tw**-0.5)

    def config_json(self) -> dict[str, Any]:
        """``segmenter.json``'s ``"model"``: the config's fields plus ``proposals`` (the proposals
        document), what :func:`resolve_deop_config` validates back."""
        return {**self.cfg.model_dump(mode="json"), "proposals": dict(self.proposals_doc)}

    # ------------------------------------------------------------------ weights
    def trainable_names(self) -> list[str]:
        """``weights.pt`` keys: everything but the CLIP towers (the learned tensors and the frozen
        proposal model under ``proposals.``, which travels inside the segmenter)."""
        return [k for k in self.state_dict() if not k.startswith("clip.")]

    def learned_names(self) -> list[str]:
        """The tensors training changes (decoder, no-object embedding, visual prompts, text context)."""
        return [k for k in self.state_dict() if not k.startswith(("clip.", "proposals."))]

    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        """:meth:`learned_names`' tensors (what a training checkpoint holds)."""
        names = set(self.learned_names())
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_learned_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load of a :meth:`learned_state_dict`.

        Raises:
            WeightsMismatchError: missing / unexpected keys or shape mismatches (listed).
        """
        load_strict(self, state_dict, source, "the DeOP model", names=self.learned_names())

    def load_proposal_weights(
        self, state_dict: Mapping[str, torch.Tensor], source: str = "proposals weights.pt"
    ) -> None:
        """Strict load of the proposal model's state dict (a pretrain_proposals ``weights.pt``).

        Raises:
            WeightsMismatchError: missing / unexpected keys or shape mismatches (listed).
        """
        load_strict(self.proposals, state_dict, source, "DeOP's proposal model")

    def trainable_parameters(self) -> list[nn.Parameter]:
        names = set(self.learned_names())
        return [p for n, p in self.named_parameters() if n in names]

    def optimizer_param_groups(self, weight_decay: float = 1e-4) -> list[dict[str, Any]]:
        """AdamW groups over :meth:`trainable_parameters` as the released ``build_optimizer``:
        LayerNorm / BatchNorm and ``nn.Embedding`` parameters without weight decay
        (``WEIGHT_DECAY_NORM`` / ``WEIGHT_DECAY_EMBED`` 0), the rest with ``weight_decay``
        (``zeroseg.optim.deop_param_groups``)."""
        return deop_param_groups(self, weight_decay)

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; the frozen CLIP towers and the proposal model stay in eval mode."""
        super().train(mode)
        self.clip.eval()
        self.proposals.eval()
        return self

    # ------------------------------------------------------------------ text
    def encode_text(self, prompt_names: Sequence[str]) -> torch.Tensor:
        """Class names -> ``[C, D]`` L2-normalised text embeddings with the learned prompt
        (:class:`TextPrompt`); differentiable w.r.t. the context vectors."""
        return self.text_prompt(self.clip, list(prompt_names))

    # ------------------------------------------------------------------ forward
    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2] % self.divisor or images.shape[-1] % self.divisor:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} must be a multiple of {self.divisor} (proposal network "
                "divisibility and CLIP patch); pad it (evaluate's short-side protocol uses size_divisibility)"
            )

    def proposal_masks(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen proposal model's mask logits ``[B, Q, H/4, W/4]`` (no gradients, eval mode)."""
        with torch.no_grad():
            dummy = None
            if self._proposal_head == "text":  # the head runs but DeOP ignores its logits
                dummy = F.normalize(torch.ones(1, int(self._proposal_text_dim), device=images.device), dim=-1)
            out = self.proposals(images, dummy)
        return out["pred_masks"].detach()

    def clip_features(self, images: torch.Tensor, mask_logits: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The one CLIP pass with patch severance and visual prompts -> ``(F_V [B, N, D]``
        L2-normalised, ``(h, w))``."""
        c = self.cfg
        x = images
        if c.clip_input_norm == "clip":  # undo the proposals' normalisation, apply CLIP's
            m0 = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            s0 = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            m1 = torch.tensor(self.clip_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            s1 = torch.tensor(self.clip_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = ((x * s0 + m0) - m1) / s1
        attention = {}
        if c.severance_layers:
            hook = severance_hook(c, mask_logits)
            attention = {int(i): hook for i in c.severance_layers}
        additive: dict[Any, Any] = {}
        if self.visual_prompts is not None:
            for row, layer in enumerate(c.visual_prompt_layers):
                additive[INPUT if layer == 0 else int(layer)] = grid_additive(
                    self.visual_prompts[row], self.prompt_grid
                )
        out = forward_trunk(self.clip.visual, x, attention=attention, additive=additive)
        feats = project(self.clip.visual, out.tokens[:, 1:])
        return F.normalize(feats.float(), dim=-1), out.grid

    def segment(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images ``[B, 3, H, W]`` (normalised with :attr:`mean` / :attr:`std`), text ``[C, D]`` ->
        ``(class logits [B, Q, C + 1]`` (last = no-object), ``proposal mask logits [B, Q, H/4, W/4])``.

        Raises:
            ValueError: images not ``[B, 3, H, W]`` with ``H, W`` multiples of :attr:`divisor`;
                text not ``[C >= 1, D]``.
        """
        self._check_images(images)
        if text_embeddings.ndim != 2 or text_embeddings.shape[-1] != self.embed_dim or text_embeddings.shape[0] < 1:
            raise ValueError(f"text_embeddings must be [C >= 1, {self.embed_dim}], got {tuple(text_embeddings.shape)}")
        mask_logits = self.proposal_masks(images)
        if mask_logits.shape[1] != self.num_queries:
            raise ValueError(f"the proposal model gave {mask_logits.shape[1]} masks, expected {self.num_queries}")
        fv, grid = self.clip_features(images, mask_logits)
        # CAL masks: sigmoid first, then bilinear to the CLIP grid (released semseg_mask_downsample)
        cal = F.interpolate(mask_logits.float().sigmoid(), size=grid, mode="bilinear", align_corners=False)
        emb = self.decoder(fv, grid, cal.flatten(2))  # [B, Q, D], normalised
        # float32 classification: a 100 x cosine in bf16 would be off by ~0.4 logits
        with torch.autocast(device_type=emb.device.type, enabled=False):
            t = F.normalize(text_embeddings.to(device=emb.device, dtype=torch.float32), dim=-1)
            classes = torch.cat([t, F.normalize(self.no_object.float(), dim=-1)], dim=0)
            logits = self.cfg.logit_scale * F.normalize(emb.float(), dim=-1) @ classes.T
        return logits, mask_logits

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """-> semantic scores ``[B, C, H, W]`` at the (padded) input size: mask logits upsampled
        before the sigmoid (:func:`deop_semantic_scores`; module docstring, step 5)."""
        logits, mask_logits = self.segment(images, text_embeddings)
        return deop_semantic_scores(logits, mask_logits, tuple(images.shape[-2:]))

    def loss(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        classes: torch.Tensor | Sequence[str],
        ignore_index: int = 255,
    ) -> dict[str, torch.Tensor]:
        """Training loss on one batch (:func:`deop_pixel_loss` with the config's weights).

        Args:
            images: ``[B, 3, H, W]`` normalised.
            target: ``[B, H', W']`` training ids ``0..C-1`` (255 ignore, trained as no-object).
            classes: the training classes' names (encoded with the learnable prompt, so the context
                vectors train) or their ``[C, D]`` text embeddings.
        """
        text = self.encode_text(classes) if not isinstance(classes, torch.Tensor) else classes
        logits, mask_logits = self.segment(images, text)
        c = self.cfg
        return deop_pixel_loss(
            logits,
            mask_logits,
            target.long(),
            focal_weight=c.focal_weight,
            dice_weight=c.dice_weight,
            output_sig=c.output_sig,
            focal_alpha=c.focal_alpha,
            focal_gamma=c.focal_gamma,
            ignore_index=ignore_index,
        )


def deop_semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """DeOP's semantic inference in the released order (released-code.md 2.6: MaskFormer's
    ``sem_seg_postprocess`` then ``semantic_inference``): the proposal mask *logits* are upsampled
    bilinearly (``align_corners=False``) to ``size``, then the sigmoid, then
    ``einsum("bqc,bqhw->bchw", softmax(class_logits)[..., :-1], sigmoid(up(m)))``. Float32 (autocast
    off). The sigmoid does not commute with the interpolation, so this differs from upsampling
    ``sigmoid(m)`` or the scores.

    Args:
        class_logits: ``[B, Q, C + 1]`` segment logits (last column: no-object, dropped after the softmax).
        mask_logits: ``[B, Q, h, w]`` proposal mask logits.
        size: ``(H, W)`` output size in pixels (the padded input size at inference).

    Returns:
        ``[B, C, H, W]`` float32 scores in ``[0, Q]``.
    """
    with torch.autocast(device_type=class_logits.device.type, enabled=False):
        m = F.interpolate(mask_logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
        return torch.einsum("bqc,bqhw->bchw", class_logits.float().softmax(-1)[..., :-1], m.sigmoid())


__all__ = ["DeOP", "build_proposal_network", "check_proposals_fit", "deop_semantic_scores", "resolve_deop_config"]
