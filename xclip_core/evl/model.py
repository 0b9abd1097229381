"""EVLModel: a frozen CLIP image encoder, EVL's temporal decoder and a linear classifier (Lin et al. 2022).

::

    frames (B, T, 3, H, W) ──CLIP ViT per frame, frozen, no grad──> last K blocks: tokens, q, k (B*T, L, ...)
        └─ decoder: query token reads block N-K+i's tokens (+ temporal conv, pos. embed, cross-attn) ─> (B, D)
            └─ head: LayerNorm, dropout, linear ─> class logits (B, classes)

The backbone's parameters never require grad and it runs under ``torch.no_grad()``: training touches the
decoder and the head alone, as in the paper (and the backbone's activations are not kept for a backward).
``get_video_features`` returns the decoder's output for the query token, before the head's LayerNorm.

The text-aligned variant (``config.text_config``; built by :func:`xclip_core.evl.build.evl_over_clip`) is the
one search uses: the decoder's feature, through a LayerNorm and a linear projection (CLIP's ``ln_post`` and
``proj``, from the checkpoint it is built from), lands in the space of a frozen CLIP text tower, and is
trained contrastively against it. It implements the pipeline's model interface (``encode_videos``,
``encode_texts``, ``identity``, ``tokenizer``, ``preprocessor``) with no re-rank stage: search ranks by
cosine.

Checkpoints: ``save_pretrained`` / ``from_pretrained`` use a Hugging Face-style directory (``config.json`` +
``model.safetensors``) on any fsspec URL; ``from_original`` converts the original release (a CLIP weight file
plus an EVL training checkpoint, see ``original.py``). Loading never executes code from a file.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoints
from ..checkpointed import CheckpointedModel
from ..model import WEIGHT_FILES, contrastive_loss
from ..sources import ModelSource
from ..text import TextTransformer
from ..tokenizer import CLIPTokenizer
from .backbone import BlockFeatures, VisionBackbone, stack_features, unstack_features
from .config import EVLConfig
from .decoder import EVLDecoder
from .original import load_original


class ClassificationHead(nn.Module):
    """The video feature (B, D) -> class logits (B, classes): LayerNorm, dropout, linear."""

    def __init__(self, dim: int, num_classes: int, dropout: float, eps: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def reset_parameters(self) -> None:
        """PyTorch's default initialization, as in the original."""
        self.layer_norm.reset_parameters()
        self.fc.reset_parameters()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.layer_norm(features)))


class TextAlignment(nn.Module):
    """The text-aligned variant's parts: the video feature (B, D) -> LayerNorm, projection -> (B, P); a
    frozen CLIP text tower and its projection (N, L) -> (N, P); the learned temperature."""

    def __init__(self, config: EVLConfig):
        super().__init__()
        text, dim, projection = config.text_config, config.vision_config.hidden_size, config.projection_dim
        self.video_layernorm = nn.LayerNorm(dim, eps=config.vision_config.layer_norm_eps)
        self.visual_projection = nn.Linear(dim, projection, bias=False)
        self.text_model = TextTransformer(text)
        self.text_projection = nn.Linear(text.hidden_size, projection, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.text_model.requires_grad_(False)  # the text space stays CLIP's
        self.text_projection.requires_grad_(False)

    def video(self, features: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.video_layernorm(features))

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            return self.text_projection(self.text_model(input_ids, attention_mask)[1])


class EVLModel(CheckpointedModel):
    """EVL: ``forward(pixel_values)`` -> class logits, ``get_video_features`` -> (B, D); the text-aligned
    variant also ``forward(pixel_values, input_ids, attention_mask)`` -> video-text logits (B, N) and the
    pipeline's model interface."""

    family = "evl"

    def __init__(self, config: EVLConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionBackbone(config.vision_config)
        self.decoder = EVLDecoder(config)
        self.head = (
            ClassificationHead(
                config.vision_config.hidden_size,
                config.num_classes,
                config.classifier_dropout,
                config.decoder_config.layer_norm_eps,
            )
            if config.num_classes
            else None
        )
        self.alignment = TextAlignment(config) if config.text_aligned else None
        self.vision_model.requires_grad_(False)  # frozen: only the decoder and the head train
        if self.decoder.query_token.device.type != "meta":  # from_pretrained builds on meta, then loads
            self.init_weights()

    # ------------------------------------------------------------------------ the model interface
    @property
    def num_frames(self) -> int:
        """Frames per video the model was trained on (any count works without a temporal position
        embedding)."""
        return self.config.num_frames

    @property
    def embedding_dim(self) -> int:
        """Width of :meth:`encode_videos`' embedding: the text space's (text-aligned), else the decoder's."""
        return self.config.projection_dim or self.config.vision_config.hidden_size

    rerank_shape = None  # no video-conditioned re-rank stage: search ranks by the embeddings' cosine

    @property
    def trains_on(self) -> str:
        """What a training table gives each video: captions (text-aligned) or labels (a classifier)."""
        return "caption" if self.config.text_aligned else "label"

    def encode_videos(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Video embeddings (B, P), not normalized, and no re-rank features: the text-aligned embedding, or
        for a classifier its video feature (usable for video-to-video similarity, not text search)."""
        features = self.get_video_features(pixel_values)
        return (self.alignment.video(features) if self.alignment else features), None

    def encode_texts(self, texts: str | list[str]) -> torch.Tensor:
        """Text embeddings (N, P) by the frozen CLIP text tower (text-aligned models only)."""
        tokens = self.tokenize(texts)
        return self.get_text_features(tokens["input_ids"], tokens["attention_mask"])

    def score(
        self, text_embeds: torch.Tensor, video_embeds: torch.Tensor, rerank_features: None = None
    ) -> torch.Tensor:
        """The score (B, N) of stored videos against texts: their embeddings' cosine (EVL has no
        video-conditioned re-rank stage)."""
        return F.normalize(video_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T

    def tokenize(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        """``texts`` as the text tower takes them (truncated to its context), on the model's device."""
        alignment = self._alignment()
        context = min(self.config.text_config.max_position_embeddings, self.tokenizer.model_max_length)
        tokens = self.tokenizer(texts, max_length=context, padding="longest")
        return {name: tensor.to(alignment.logit_scale.device) for name, tensor in tokens.items()}

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text embeddings (N, P), not normalized."""
        return self._alignment().text(input_ids, attention_mask)

    def _alignment(self) -> TextAlignment:
        if self.alignment is None:
            raise ValueError(
                f"this EVL model ({self.source or 'in memory'}) is a classifier of {self.config.num_classes} "
                "classes with no text tower: it classifies videos but cannot be searched by text; train a "
                "text-aligned EVL model on captions (videosearch train --family evl) to search"
            )
        return self.alignment

    # ------------------------------------------------------------------------------------ forward
    def backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's output for videos (B, T, 3, H, W), stacked (B, K, 3, T, L, D) (see
        :func:`~xclip_core.evl.backbone.stack_features`): what the decoder reads. It never changes while the
        decoder trains, so a training run may compute it once per clip and step from it
        (``backbone_features=`` of :meth:`forward` and :meth:`training_loss`)."""
        return stack_features(self._backbone(pixel_values), pixel_values.shape[1])

    def get_video_features(
        self, pixel_values: torch.Tensor | None = None, backbone_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Video features (B, D): the decoder's output for its query token, before the head's LayerNorm; of
        videos (B, T, 3, H, W), or of their :meth:`backbone_features` computed earlier."""
        if (pixel_values is None) == (backbone_features is None):
            raise ValueError("pass either pixel_values or backbone_features")
        if backbone_features is None:
            return self.decoder(self._backbone(pixel_values), pixel_values.shape[1])
        expected = (self.config.decoder_config.num_layers, 3)
        if backbone_features.ndim != 6 or tuple(backbone_features.shape[1:3]) != expected:
            raise ValueError(
                f"backbone_features must be (batch, {expected[0]}, 3, frames, tokens, width) as "
                f"backbone_features() returns, got shape {tuple(backbone_features.shape)}"
            )
        heads = self.config.vision_config.num_attention_heads
        return self.decoder(unstack_features(backbone_features, heads), backbone_features.shape[3])

    def _backbone(self, pixel_values: torch.Tensor) -> list[BlockFeatures]:
        """The frozen backbone's last K blocks' features for videos (B, T, 3, H, W)."""
        if pixel_values.ndim != 5:
            raise ValueError(
                f"pixel_values must be (batch, frames, 3, H, W), got shape {tuple(pixel_values.shape)}"
            )
        frames, channels = pixel_values.shape[1], pixel_values.shape[2]
        if channels != self.config.vision_config.num_channels:
            raise ValueError(
                f"pixel_values must have {self.config.vision_config.num_channels} channels in dimension 2 "
                f"(batch, frames, channels, H, W), got shape {tuple(pixel_values.shape)}"
            )
        if self.config.decoder_config.temporal_position_embedding and frames != self.config.num_frames:
            raise ValueError(
                f"this model takes {self.config.num_frames} frames per video (its temporal position "
                f"embedding has one entry per frame), got {frames}"
            )
        with torch.no_grad():  # the frozen backbone: no gradients, no saved activations
            return self.vision_model(pixel_values.flatten(0, 1), self.config.decoder_config.num_layers)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        backbone_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits (B, classes) of videos (B, T, 3, H, W) (or of their ``backbone_features``); given
        texts (``input_ids`` (N, L)), the video-text logits (B, N) instead: the scaled cosine of the
        text-aligned embeddings."""
        features = self.get_video_features(pixel_values, backbone_features)
        if input_ids is None:
            if self.head is None:
                raise ValueError("this EVL model has no classifier (num_classes is 0): pass texts to score")
            return self.head(features)
        videos = F.normalize(self._alignment().video(features), dim=-1)
        texts = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        return self.alignment.logit_scale.exp() * videos @ texts.T

    def training_loss(
        self,
        model: nn.Module,
        pixel_values: torch.Tensor | None,
        targets: list[str],
        tokenizer: CLIPTokenizer,
        backbone_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training objective, run through ``model`` (this model or its data-parallel wrapper) on
        videos or their ``backbone_features``: the contrastive loss against the captions (text-aligned), or
        the cross-entropy of the labels (a classifier; ``config.labels`` names the classes)."""
        inputs = {"pixel_values": pixel_values, "backbone_features": backbone_features}
        if self.trains_on == "caption":
            tokens = self.tokenize(targets)
            return contrastive_loss(model(**inputs, **tokens))
        labels = self.config.labels or []
        unknown = sorted(set(targets) - set(labels))
        if unknown:
            raise ValueError(
                f"labels the model has no class for: {unknown[:5]} (its classes: {labels[:10]}...)"
            )
        device = (pixel_values if pixel_values is not None else backbone_features).device
        index = torch.tensor([labels.index(t) for t in targets], device=device)
        return F.cross_entropy(model(**inputs), index)

    # -------------------------------------------------------------------------------- init & I/O
    @torch.no_grad()
    def init_weights(self) -> None:
        """Random initialization: CLIP's scheme for the backbone (normally replaced by CLIP's weights), the
        original EVL code's for the decoder and the head."""
        for module in self.vision_model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        embeddings = self.vision_model.embeddings
        nn.init.normal_(embeddings.class_embedding, std=self.config.vision_config.hidden_size**-0.5)
        nn.init.normal_(embeddings.position_embedding.weight, std=0.02)
        self.decoder.reset_parameters()
        if self.head is not None:
            self.head.reset_parameters()
        if self.alignment is not None:
            nn.init.normal_(
                self.alignment.visual_projection.weight, std=self.config.vision_config.hidden_size**-0.5
            )

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        storage_options: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> EVLModel:
        """Load a directory written by :meth:`save_pretrained` (``config.json`` + ``model.safetensors``)
        from a local path or fsspec URL. Original-release files load with :meth:`from_original`."""
        source = ModelSource(src, storage_options)
        if source.is_file() or not source.exists(""):
            raise FileNotFoundError(
                f"EVL checkpoint {source.uri!r} is not a directory holding config.json and "
                "model.safetensors; convert the original release's files with "
                "EVLModel.from_original(backbone=..., checkpoint=...)"
            )
        name = source.first_existing(*WEIGHT_FILES)
        if name is None:
            raise FileNotFoundError(f"{source.uri}: no weights found (looked for {', '.join(WEIGHT_FILES)})")
        config = EVLConfig.from_dict(source.read_json("config.json"))
        return cls.from_weights(
            config, checkpoints.open_weights(source, name), os.fspath(src), storage_options, dtype, device
        )

    @classmethod
    def from_original(
        cls,
        backbone: str | os.PathLike | None,
        checkpoint: str | os.PathLike,
        decoder_num_heads: int | None = None,
        backbone_num_heads: int | None = None,
        num_frames: int | None = None,
        storage_options: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> EVLModel:
        """Load the original release: CLIP image-encoder weights plus an EVL training checkpoint.

        See :func:`xclip_core.evl.original.load_original` for the layouts read and what is inferred.
        """
        return load_original(
            cls,
            backbone,
            checkpoint,
            decoder_num_heads=decoder_num_heads,
            backbone_num_heads=backbone_num_heads,
            num_frames=num_frames,
            storage_options=storage_options,
            dtype=dtype,
            device=device,
        )

    @classmethod
    def from_weights(
        cls,
        config: EVLConfig,
        weights: checkpoints.Weights,
        source: str | None = None,
        storage_options: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> EVLModel:
        """Build the model for ``config`` and fill it with ``weights`` (in this model's names), which must
        match it exactly (``CheckpointError`` names what does not)."""
        model = checkpoints.load_into(lambda: cls(config), weights, dtype, device)
        model.source, model.storage_options = source, storage_options
        return model
