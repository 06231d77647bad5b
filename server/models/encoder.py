"""The built-in `encoder`: a small transformer encoder over token ids, the demo model for
variable-length inputs. Token ids int64 [n, L] and a padding mask bool [n, L] (true at padding,
filled by the server) -> a mean-pooled float32 [n, 128] embedding of each sample's own tokens.

Weights come from numpy's PCG64, so they are identical on every machine and torch version.
Imports torch lazily (worker processes and `microbatch infer` only). The encoder is built
without nested tensors: that fast path drops padded positions and changes output shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SEED = 20261205
VOCAB = 30_000
WIDTH = 128
HEADS = 4
LAYERS = 2
FEEDFORWARD = 256  # kept small: fast enough on one CPU core for the tests and the bench


def build_encoder() -> Any:
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, WIDTH)
            layer = torch.nn.TransformerEncoderLayer(
                WIDTH, HEADS, FEEDFORWARD, dropout=0.0, batch_first=True
            )
            self.layers = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)

        def forward(self, ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.layers(self.embed(ids), src_key_padding_mask=padding_mask)
            keep = (~padding_mask).unsqueeze(-1).to(hidden.dtype)
            pooled: torch.Tensor = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
            return pooled

    model = Encoder()
    _fill_weights(model)
    return model.eval()


def _fill_weights(model: Any) -> None:
    """Every parameter from one PCG64 stream, in declaration order: weights uniform within
    +-1/sqrt(fan_in) as torch initialises them, biases 0, layer norms 1 and 0, embeddings
    normal(0, 0.02)."""
    import torch

    rng = np.random.Generator(np.random.PCG64(SEED))
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = tuple(param.shape)
            if name.startswith("embed"):
                values = rng.normal(0.0, 0.02, size=shape)
            elif "norm" in name:
                values = np.ones(shape) if name.endswith("weight") else np.zeros(shape)
            elif name.endswith("bias"):
                values = np.zeros(shape)
            else:
                bound = 1.0 / np.sqrt(shape[1])
                values = rng.uniform(-bound, bound, size=shape)
            param.copy_(torch.from_numpy(values.astype(np.float32)))
