"""The JSON API's payloads, version 1 (`/api/v1/...`): pydantic models whose field names are the contract that
the front end, the tests and outside tools rely on (docs/EXPLORER.md lists them). Layers are block indices
everywhere; activations are the SAE's post-ReLU values; `null` stands for a number that does not exist (the mean
layer of a latent that never fires)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MAX_TEXT_CHARS = 4000
"""The longest prompt the live routes accept (longer: 413)."""
MAX_EDITS = 16
"""The most steering edits one request may carry (more: 413)."""
MAX_NEW_TOKENS = 64
"""The longest continuation /prompt/generate draws."""


class TokenValue(BaseModel):
    token: str
    value: float


class SimilarLatent(BaseModel):
    latent: int
    cosine: float


class EvalLayers(BaseModel):
    """Per-layer results of `mlsae-train eval`, where the index was given them."""

    layer: list[int]
    fvu: list[float | None]
    delta_ce: list[float] | None = None


class Meta(BaseModel):
    n_latents: int
    k: int
    layers: list[int]
    n_tokens: int
    model: str | None
    live: bool
    n_rows: int = Field(description="Tokens the statistics used (trainable ones unless the index kept all).")
    n_docs: int
    n_firing: int = Field(description="Latents that fire at least once.")
    context_length: int
    d_model: int | None
    has_logits: bool
    logits_note: str | None
    eval: EvalLayers | None
    sources: dict[str, str] = Field(description="Store name -> the path the server reads it from.")
    token_text: str | None = Field(description="Why token ids stand in for text, when they do.")


class Histogram(BaseModel):
    """Counts of activations in equal bins of [0, `max`]; `layers` holds one row per layer, `all` the tokens'
    largest activation over layers."""

    max: float
    all: list[int]
    layers: list[list[int]]


class Latent(BaseModel):
    latent: int
    layer_probs: list[float | None] = Field(description="P_j(l) per layer, equal to the variance output's probs.")
    counts: list[int] = Field(description="Rows where the latent fires, per layer.")
    max: list[float] = Field(description="Largest activation per layer.")
    mean_layer: float | None = Field(description="E[L|j] as a block index (interpolated between blocks).")
    layer_std: float | None = Field(description="sqrt(Var[L|j]) in layer positions.")
    within_var: float | None = Field(description="E_T[Var(L|T, j)]: spread over layers inside one token.")
    across_var: float | None = Field(description="Var_T(E[L|T, j]): spread of the token's own mean layer.")
    density: float = Field(description="Share of the tokens used where the latent fires at some layer.")
    tokens_fired: int
    max_all: float
    mean_all: float | None = Field(description="Mean over tokens where it fires of its largest activation.")
    histogram: Histogram
    quantile_edges: list[list[float]] = Field(description="Per tab (all, then each layer): group edges.")
    logits_pos: list[TokenValue]
    logits_neg: list[TokenValue]
    similar: list[SimilarLatent]


class Example(BaseModel):
    token: int = Field(description="Row of the example's token in the cache (and latents store).")
    sequence: int
    position: int
    layer: int = Field(description="Block index of the example's activation.")
    value: float
    tokens: list[str] = Field(description="The window's tokens as text.")
    values: list[float] = Field(description="The latent's activation at each window token, at `layer`.")
    layer_strip: list[float] = Field(description="The latent's activation at the example's token, per layer.")
    focus: int = Field(description="Index of the example's token in `tokens`.")
    skipped: list[int] = Field(description="Window indices of tokens left out of the statistics (value 0).")
    group: int | None = Field(default=None, description="Quantile group, for kind=quantile.")


class Examples(BaseModel):
    latent: int
    layer: str = Field(description="'all' or the block index of the tab.")
    kind: str
    offset: int
    total: int = Field(description="Examples in this list (before offset and limit).")
    examples: list[Example]
    group_edges: list[float] | None = Field(default=None, description="Quantile group edges, for kind=quantile.")


class LatentRow(BaseModel):
    latent: int
    density: float
    max: float
    mean_layer: float | None
    layer_std: float | None
    within_var: float | None
    across_var: float | None
    top_logit: str | None


class LatentTable(BaseModel):
    total: int = Field(description="Latents matching the filters.")
    offset: int
    rows: list[LatentRow]


class Overview(BaseModel):
    """P_j(l) of the latents that fire, by mean layer, in `columns` columns of `per_column` latents each (the
    last may hold fewer): `cells` is base64 of uint8 [L, columns] (255 = the largest shown value, `scale`)."""

    layers: list[int]
    columns: int
    per_column: int
    scale: float
    cells: str
    latent: list[int] = Field(description="Per column, the latent it opens: the one of most activation mass.")
    mean_layer: list[float] = Field(description="Per column, the mean layer (block index) of its first latent.")


class DocCell(BaseModel):
    position: int
    layer: int
    value: float


class TokenLatent(BaseModel):
    latent: int
    values: list[float] = Field(description="Activation per layer at the selected token.")
    mean_layer: float | None


class Doc(BaseModel):
    doc: int
    start: int = Field(description="Row of the window's first token.")
    tokens: list[str]
    positions: list[int]
    skipped: list[int]
    latent: int | None
    cells: list[DocCell] = Field(description="Where the selected latent fires in this window.")
    latent_max: float | None = Field(description="The selected latent's largest activation over the store.")
    position: int | None
    token_latents: list[TokenLatent] = Field(description="Latents active at the selected token, by mean layer.")


class Problem(BaseModel):
    detail: str
    rebuild: str | None = None


class PromptRequest(BaseModel):
    text: str = Field(description="The prompt, tokenised as the harvest tokenises a document.")


class PromptLayersRequest(PromptRequest):
    delta_ce: bool = Field(False, description="Also splice each layer's reconstruction in turn (L re-runs).")


class Prompt(BaseModel):
    """A prompt through the model and the SAE at every layer; (L, P, k) arrays hold each (layer, token) row's
    top-k latents."""

    tokens: list[str]
    trainable: list[bool] = Field(description="False at position 0 and special tokens: shown, never trained on.")
    layers: list[int]
    indices: list[list[list[int]]]
    values: list[list[list[float]]]
    quantiles: list[list[list[float | None]]] = Field(
        description="Each value's quantile among the latent's own activations at that layer in the store (null "
        "where it never fired there)."
    )
    fvu: list[float | None] = Field(description="Per layer, over the trainable tokens.")
    delta_ce: list[float] | None = Field(None, description="Per layer, when asked for.")


class PromptDeltaCe(BaseModel):
    """Delta CE of the prompt with the reconstruction spliced in at each layer in turn (one re-run per layer)."""

    layers: list[int]
    delta_ce: list[float]


class Edit(BaseModel):
    latent: int
    layer: int = Field(description="Block index.")
    factor: float
    mode: Literal["add", "clamp"] = "add"
    unit: Literal["typical", "raw"] = Field(
        "typical", description="typical: the factor times the latent's mean activation at that layer."
    )


class LogitsRequest(PromptRequest):
    layer: int
    position: int
    top: int = Field(10, ge=1, le=50)


class Logits(BaseModel):
    layer: int
    position: int
    token: str = Field(description="The token at `position`.")
    next_token: str | None = Field(description="The prompt's next token, if any.")
    clean: list[TokenValue] = Field(description="Top logits of the model.")
    recon: list[TokenValue] = Field(description="Top logits with the reconstruction spliced in at `layer`.")
    increases: list[TokenValue] = Field(description="Largest rises of the log-probability (nats) with the splice.")
    decreases: list[TokenValue] = Field(description="Largest falls of the log-probability (nats) with the splice.")
    delta_ce: float = Field(description="Over the prompt's trainable positions (nats).")
    kl: float = Field(description="KL(clean || spliced) over the same positions (nats).")


class SteerRequest(PromptRequest):
    edits: list[Edit]
    positions: str = Field("all", description="all, from:P or only:P.")
    top: int = Field(5, ge=1, le=50)
    measure: Literal["logit", "logprob"] = Field(
        "logit", description="Rank and report changes of the logits, or of the log-probabilities (nats)."
    )


class PositionChange(BaseModel):
    position: int
    token: str
    increases: list[TokenValue]
    decreases: list[TokenValue]


class EditScale(BaseModel):
    latent: int
    layer: int
    raw: float = Field(description="The amount added to the latent's activation (clamp: its target).")


class Steer(BaseModel):
    changes: list[PositionChange]
    scales: list[EditScale]


class GenerateRequest(PromptRequest):
    edits: list[Edit] = []
    positions: str = "all"
    n_tokens: int = Field(20, ge=1, le=MAX_NEW_TOKENS)
    seed: int = 0
    temperature: float = Field(1.0, ge=0.0, le=10.0)


class Generate(BaseModel):
    default: str
    steered: str
    n_tokens: int
    seed: int
    temperature: float
