"""XCLIPModel: the two CLIP towers, the MIT and the video-specific prompt generator, wired as in the paper.

::

    frames (B, T, 3, H, W) ──vision (cross-frame)──> class states ──visual_projection──> (B, T, P)
        │                                                               └──MIT──> video embedding (B, P)
        └─ patch states ──prompts_visual_layernorm, @ prompts_visual_projection, mean over T─> (B, patches, P)
    text ids (N, L) ──text tower──> end-of-text state ──text_projection──> (N, P)
    logits[b, n] = scale * cos(video[b], text[n] + prompt_generator(text[n], patches[b]))

The API mirrors ``transformers.XCLIPModel`` (``from_pretrained``, ``get_video_features``,
``get_text_features``, ``forward`` with ``logits_per_video`` / ``logits_per_text``); ``encode_videos`` adds
the one pass the index needs (video embedding and patch features together). The model also implements the
pipeline's model interface (``pipeline.models.VideoTextModel``): ``identity``, ``processor``,
``encode_texts`` and ``score`` (the exact video-conditioned score, as a cosine).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints
from .checkpointed import CheckpointedModel
from .config import XCLIPConfig, preset
from .mit import MultiframeIntegrationTransformer
from .prompt import VideoSpecificPromptGenerator
from .sources import ModelSource
from .text import TextTransformer
from .tokenizer import CLIPTokenizer
from .vision import VisionTransformer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass
class VideoFeatures:
    """What a search index keeps per video: both come from one pass over the frames."""

    video_embeds: torch.Tensor  # (B, P) MIT output, not normalized (= get_video_features)
    prompt_features: torch.Tensor  # (B, patches, P) input of the prompt generator: the re-rank features

    def __iter__(self) -> Iterator[torch.Tensor]:
        """``embedding, rerank_features = model.encode_videos(pixel_values)``."""
        return iter((self.video_embeds, self.prompt_features))


@dataclass
class XCLIPOutput:
    logits_per_video: torch.Tensor  # (B, N)
    logits_per_text: torch.Tensor  # (N, B)
    video_embeds: torch.Tensor  # (B, P) normalized
    text_embeds: torch.Tensor  # (B, N, P) normalized, conditioned on each video
    loss: torch.Tensor | None = None


class XCLIPModel(CheckpointedModel):
    family = "xclip"

    def __init__(self, config: XCLIPConfig):
        super().__init__()
        self.config = config
        text, vision = config.text_config, config.vision_config
        self.text_model = TextTransformer(text)
        self.vision_model = VisionTransformer(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.prompts_visual_layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.prompts_visual_projection = nn.Parameter(torch.empty(vision.hidden_size, config.projection_dim))
        self.mit = MultiframeIntegrationTransformer(vision)
        self.prompts_generator = VideoSpecificPromptGenerator(config)
        if self.logit_scale.device.type != "meta":  # from_pretrained builds on meta, then loads every weight
            self.init_weights()

    # ------------------------------------------------------------------------ the model interface
    @property
    def num_frames(self) -> int:
        """Frames per video the model takes."""
        return self.config.vision_config.num_frames

    @property
    def embedding_dim(self) -> int:
        """Width P of the video and text embeddings."""
        return self.config.projection_dim

    @property
    def rerank_shape(self) -> tuple[int, int]:
        """Shape of one video's re-rank features: the prompt generator's input (patches, P)."""
        return self.config.vision_config.num_patches, self.config.projection_dim

    def encode_texts(self, texts: str | list[str]) -> torch.Tensor:
        """Text embeddings (N, P) of ``texts`` with this model's tokenizer (truncated to the context)."""
        tokens = self.tokenize(self.tokenizer, texts)
        return self.get_text_features(tokens["input_ids"], tokens["attention_mask"])

    def score(
        self, text_embeds: torch.Tensor, video_embeds: torch.Tensor, prompt_features: torch.Tensor
    ) -> torch.Tensor:
        """The exact X-CLIP score (B, N) of stored videos against texts, as a cosine in [-1, 1]: the
        logits without their scale."""
        return self._scores(video_embeds, prompt_features, text_embeds)[2] / self.logit_scale.exp()

    # ----------------------------------------------------------------------------------- encoders
    def _frames(
        self, pixel_values: torch.Tensor, with_patches: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(B, T, C, H, W) -> patch states (B, T, patches, D) or None, projected class states (B, T, P)."""
        if pixel_values.ndim != 5:
            raise ValueError(
                f"pixel_values must be (batch, frames, 3, H, W), got shape {tuple(pixel_values.shape)}"
            )
        batch, frames = pixel_values.shape[:2]
        if frames != self.config.vision_config.num_frames:
            raise ValueError(
                f"this model takes {self.config.vision_config.num_frames} frames per video, got {frames}"
            )
        tokens, pooled = self.vision_model(pixel_values.flatten(0, 1), class_only=not with_patches)
        cls = self.visual_projection(pooled).view(batch, frames, -1)
        patches = tokens[:, 1:].unflatten(0, (batch, frames)) if with_patches else None
        return patches, cls

    def get_video_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Video embeddings (B, P), not normalized, as ``transformers.XCLIPModel.get_video_features``."""
        _, cls = self._frames(pixel_values, with_patches=False)
        return self.mit(cls)

    def tokenize(
        self, tokenizer: CLIPTokenizer, texts: str | list[str], padding: bool | str = "longest"
    ) -> dict[str, torch.Tensor]:
        """``texts`` as this model's text tower takes them: truncated to its context (or the tokenizer's,
        if shorter), on the model's device; ``input_ids`` and ``attention_mask`` for
        :meth:`get_text_features`."""
        context = min(self.config.text_config.max_position_embeddings, tokenizer.model_max_length)
        tokens = tokenizer(texts, max_length=context, padding=padding)
        return {name: tensor.to(self.logit_scale.device) for name, tensor in tokens.items()}

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text embeddings (N, P), not normalized and WITHOUT the video-specific prompt."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def encode_videos(self, pixel_values: torch.Tensor) -> VideoFeatures:
        """One pass: the video embeddings and the patch features that the prompt generator consumes."""
        patches, cls = self._frames(pixel_values)
        patches = self.prompts_visual_layernorm(patches) @ self.prompts_visual_projection
        return VideoFeatures(video_embeds=self.mit(cls), prompt_features=patches.mean(dim=1))

    # ------------------------------------------------------------------------------------ scoring
    def condition_text(self, text_embeds: torch.Tensor, prompt_features: torch.Tensor) -> torch.Tensor:
        """Add each video's prompt to each text: (N, P), (B, patches, P) -> (B, N, P)."""
        text = text_embeds.unsqueeze(0).expand(prompt_features.shape[0], -1, -1)
        return text + self.prompts_generator(text, prompt_features)

    def logits(
        self, video_embeds: torch.Tensor, prompt_features: torch.Tensor, text_embeds: torch.Tensor
    ) -> torch.Tensor:
        """The full X-CLIP score (B, N) from stored video features and unnormalized text embeddings."""
        return self._scores(video_embeds, prompt_features, text_embeds)[2]

    def _scores(
        self, video_embeds: torch.Tensor, prompt_features: torch.Tensor, text_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        video = F.normalize(video_embeds, dim=-1)  # (B, P)
        text = F.normalize(self.condition_text(text_embeds, prompt_features), dim=-1)  # (B, N, P)
        return video, text, self.logit_scale.exp() * torch.einsum("bd,bnd->bn", video, text)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
    ) -> XCLIPOutput:
        videos = self.encode_videos(pixel_values)
        text = self.get_text_features(input_ids, attention_mask)
        video, text, logits = self._scores(videos.video_embeds, videos.prompt_features, text)
        loss = contrastive_loss(logits) if return_loss else None
        return XCLIPOutput(logits, logits.T, video, text, loss)

    #: what a training table gives each video: captions (a labeled table's labels through its template)
    trains_on = "caption"

    def training_loss(
        self, model: nn.Module, pixel_values: torch.Tensor, captions: list[str], tokenizer: CLIPTokenizer
    ) -> torch.Tensor:
        """The training objective on a batch whose i-th caption describes the i-th video: the contrastive
        loss of :meth:`forward`, run through ``model`` (this model, or its data-parallel wrapper, whose
        forward synchronizes the gradients)."""
        tokens = self.tokenize(tokenizer, captions)
        return model(tokens["input_ids"], pixel_values, tokens["attention_mask"], return_loss=True).loss

    # -------------------------------------------------------------------------------- init & I/O
    @torch.no_grad()
    def init_weights(self) -> None:
        """Random initialization for training from scratch (CLIP's scheme, as in ``transformers``)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        vision = self.config.vision_config
        nn.init.normal_(self.vision_model.embeddings.class_embedding, std=vision.hidden_size**-0.5)
        nn.init.normal_(self.prompts_visual_projection, std=vision.hidden_size**-0.5)
        nn.init.normal_(self.mit.position_embedding, std=0.02)

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        config: XCLIPConfig | str | None = None,
        storage_options: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> XCLIPModel:
        """Load a checkpoint from a directory or fsspec URL, or from a single weights file.

        A directory holds the Hugging Face layout (``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``). A single file may be an original-release ``.pth``; its geometry comes from
        ``config`` (an ``XCLIPConfig`` or a preset name) or, if omitted, from the tensor shapes.
        Weights are only ever read as tensors: loading never executes code from the checkpoint.
        """
        source = ModelSource(src, storage_options)
        if isinstance(config, str):
            config = preset(config)
        if source.is_file():
            weights = checkpoints.open_weights(source)
        elif source.exists(""):
            name = source.first_existing(*WEIGHT_FILES)
            if name is None:
                raise FileNotFoundError(
                    f"{source.uri}: no weights found (looked for {', '.join(WEIGHT_FILES)})"
                )
            if config is None:
                config = XCLIPConfig.from_dict(source.read_json("config.json"))
            weights = checkpoints.open_weights(source, name)
        else:
            raise FileNotFoundError(
                f"X-CLIP checkpoint {source.uri!r} not found. Pass a local directory or an fsspec URL "
                "holding config.json and model.safetensors (e.g. a copy of microsoft/xclip-base-patch32), "
                "or an original-release .pth file."
            )
        # derived buffers that old checkpoints stored; they are not weights
        weights = weights.without(lambda key: key.endswith("embeddings.position_ids"))
        if checkpoints.is_original_layout(weights):
            state = dict(weights.tensors())
            config = config or checkpoints.config_from_original(state)
            weights = checkpoints.Weights.of(checkpoints.original_to_hf(state))
        if config is None:
            raise ValueError(
                f"{source.uri}: a single weights file needs a config (an XCLIPConfig or a preset name)"
            )
        model = checkpoints.load_into(lambda: cls(config), weights, dtype, device)
        model.source, model.storage_options = os.fspath(src), storage_options
        return model


def contrastive_loss(logits_per_video: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over a (B, B) logit matrix whose diagonal holds the matching pairs."""
    target = torch.arange(len(logits_per_video), device=logits_per_video.device)
    return (F.cross_entropy(logits_per_video, target) + F.cross_entropy(logits_per_video.T, target)) / 2
