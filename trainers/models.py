"""Models built on torchrec's modules: DLRM (dot interaction) and DCN-v2 (low-rank cross net, MLPerf's layout).

Both take dense features and the embeddings of the sparse features as a
``KeyedTensor`` (one key per table), which the cache produces from a
``KeyedJaggedTensor`` of cache slots (see ``trainers.cache``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, InteractionDCNArch, OverArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.sparse.jagged_tensor import KeyedTensor

from bagpipe.config import ModelConfig


class DLRMDense(nn.Module):
    """DLRM's dense part: bottom MLP, pairwise dot interaction, top MLP (torchrec's arches)."""

    def __init__(self, cfg: ModelConfig, num_dense: int, num_tables: int) -> None:
        super().__init__()
        # Datasets without dense features (Avazu) feed a constant 1 so the arch stays the same.
        self.num_dense = max(1, num_dense)
        self.dense_arch = DenseArch(self.num_dense, list(cfg.bottom_mlp))
        self.inter_arch = InteractionArch(num_sparse_features=num_tables)
        over_in = cfg.embedding_dim + num_tables * (num_tables + 1) // 2
        self.over_arch = OverArch(over_in, list(cfg.top_mlp))

    def forward(self, dense: torch.Tensor, sparse: KeyedTensor) -> torch.Tensor:
        if dense.shape[1] == 0:
            dense = torch.ones(dense.shape[0], 1, dtype=torch.float32, device=dense.device)
        embedded_dense = self.dense_arch(dense)
        keys = sparse.keys()
        stacked = sparse.values().view(dense.shape[0], len(keys), -1)  # [B, tables, dim]
        return self.over_arch(self.inter_arch(embedded_dense, stacked)).squeeze(-1)


class DCNDense(nn.Module):
    """DCN-v2 as MLPerf's DLRM-DCNv2 lays it out: the bottom MLP over the dense features, its output
    concatenated with the embeddings, a low-rank cross net (``dcn_layers`` layers of rank
    ``dcn_rank``, torchrec's ``InteractionDCNArch``), then the top MLP (torchrec's ``OverArch``)."""

    def __init__(self, cfg: ModelConfig, num_dense: int, num_tables: int) -> None:
        super().__init__()
        self.num_dense = max(1, num_dense)
        self.dense_arch = DenseArch(self.num_dense, list(cfg.bottom_mlp))
        width = (num_tables + 1) * cfg.embedding_dim
        cross = LowRankCrossNet(width, num_layers=cfg.dcn_layers, low_rank=cfg.dcn_rank)
        self.inter_arch = InteractionDCNArch(num_sparse_features=num_tables, crossnet=cross)
        self.over_arch = OverArch(width, list(cfg.top_mlp))

    def forward(self, dense: torch.Tensor, sparse: KeyedTensor) -> torch.Tensor:
        if dense.shape[1] == 0:
            dense = torch.ones(dense.shape[0], 1, dtype=torch.float32, device=dense.device)
        stacked = sparse.values().view(dense.shape[0], len(sparse.keys()), -1)  # [B, tables, dim]
        return self.over_arch(self.inter_arch(self.dense_arch(dense), stacked)).squeeze(-1)


def build_dense_model(cfg: ModelConfig, num_dense: int, num_tables: int) -> nn.Module:
    """The model's dense part; call under the same torch seed on every rank."""
    if cfg.name == "dlrm":
        return DLRMDense(cfg, num_dense, num_tables)
    if cfg.name == "dcn":
        return DCNDense(cfg, num_dense, num_tables)
    raise ValueError(f"config key 'model': unknown model {cfg.name!r}")
