"""Trainable parts for personalizing text-conditioned networks: a new token row and the cross-attention K/V.

* :class:`NewTokenEmbedding` -- a new token in a CLIP tokenizer and one new row of its text encoder's embedding
  table, initialised from a related word (textual inversion, Gal et al. 2023). The row is a separate parameter
  that a forward hook writes into the looked-up embeddings, so no other row of the (frozen) table can change.
* :class:`CrossAttentionKV` -- the keys and values of every cross-attention layer (the layers that read the text)
  as the only trainable weights of a network (Custom Diffusion, Kumari et al., CVPR 2023), or LoRA adapters on
  them. It wraps the network's :class:`~stepdistill.denoiser.Denoiser` without registering it, so its
  ``parameters()`` / ``state_dict()`` (what optimizers and checkpoints see) are those layers alone, while its
  ``forward`` runs the whole denoiser (one DDP forward per backward).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..denoiser import Denoiser, DenoiserOutput

#: Name of the LoRA adapter on the K/V layers (``kv_lora_rank > 0``).
KV_ADAPTER = "kv"


class NewTokenEmbedding(nn.Module):
    """One new token and its trainable embedding row in a CLIP text encoder.

    Adds ``token`` to ``tokenizer``, grows the text encoder's table by one row, and initialises that row (and the
    trainable ``weight``) with the mean of the rows of ``initializer``'s tokens. A forward hook on the embedding
    table replaces the looked-up vector at the new id with ``weight``; the table itself stays frozen.

    Args:
        text_encoder: A transformers text encoder (``get_input_embeddings()``; its table is frozen here).
        tokenizer: Its tokenizer (``add_tokens``).
        token: The new token string, e.g. ``"<new1>"``; must not be in the vocabulary.
        initializer: A related word whose token embedding(s) initialise the row, e.g. ``"slanted"``.

    Example:
        >>> new = NewTokenEmbedding(pipe.text_encoder, pipe.tokenizer, "<new1>", "dog")
        >>> pipe.encode_prompt(["a photo of <new1>"], "cpu", 1, False)  # reads new.weight, with gradient
    """

    def __init__(self, text_encoder: nn.Module, tokenizer: Any, token: str, initializer: str) -> None:
        super().__init__()
        vocab = tokenizer.get_vocab()
        if token in vocab:
            raise ValueError(
                f"placeholder_token {token!r} is already in the tokenizer's vocabulary (id {vocab[token]}): pick a "
                "string the tokenizer does not know, e.g. '<new1>' or '<sks-concept>'."
            )
        init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
        if not initializer.strip() or not init_ids:
            raise ValueError(f"initializer_token {initializer!r} gives no tokens: pass a related word, e.g. 'dog'.")
        if tokenizer.add_tokens([token]) != 1:
            raise ValueError(f"The tokenizer did not add placeholder_token {token!r}: pick another string.")
        self.token, self.initializer = token, initializer
        self.token_id = int(tokenizer.convert_tokens_to_ids(token))
        clash = [t for t, i in vocab.items() if i == self.token_id]
        if clash:  # a vocabulary whose ids are not 0..N-1 can hand out an id that a token already has
            raise ValueError(f"The tokenizer gave placeholder_token {token!r} the id {self.token_id} of {clash[0]!r}: "
                             "its vocabulary ids are not contiguous; use a tokenizer with ids 0..N-1.")
        # grow the table only when the new id is past its end (a sparse vocabulary may have unused rows; never shrink)
        if self.token_id >= text_encoder.get_input_embeddings().num_embeddings:
            text_encoder.resize_token_embeddings(self.token_id + 1, mean_resizing=False)
        table = text_encoder.get_input_embeddings()
        table.requires_grad_(False)  # only the separate row trains
        with torch.no_grad():
            init = table.weight[init_ids].float().mean(0)
            table.weight[self.token_id] = init.to(table.weight.dtype)
        self.weight = nn.Parameter(init[None].clone())
        self.__dict__["table"] = table  # not registered: the frozen table is not this module's state
        self._hook = table.register_forward_hook(self._replace)

    def _replace(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        ids = args[0] if args else None
        if ids is None:  # called with inputs_embeds only
            return output
        mask = (ids == self.token_id).unsqueeze(-1)
        return torch.where(mask, self.weight.to(output.dtype).reshape(1, 1, -1).expand_as(output), output)

    @torch.no_grad()
    def write_to_table(self) -> None:
        """Copy the trained row into the text encoder's table (what an exported text encoder holds)."""
        table = self.__dict__["table"]
        table.weight[self.token_id] = self.weight[0].to(table.weight.dtype)

    def forward(self) -> torch.Tensor:
        """The trained row ``[1, D]``."""
        return self.weight


def cross_attention_kv_names(network: nn.Module) -> list[str]:
    """Module names of the ``to_k`` / ``to_v`` layers of every cross-attention layer of a diffusers network."""
    from diffusers.models.attention_processor import Attention

    names = []
    for name, module in network.named_modules():
        if isinstance(module, Attention) and getattr(module, "is_cross_attention", False):
            names += [f"{name}.to_k", f"{name}.to_v"]
    return names


class CrossAttentionKV(nn.Module):
    """A denoiser whose only trainable weights are its cross-attention keys and values (Custom Diffusion).

    Full mode (``lora_rank=0``): the network's own ``to_k`` / ``to_v`` layers train -- each role loads its own
    network, so these are copies of the pretrained layers, and an export needs no merge. LoRA mode: a peft LoRA
    adapter of rank ``lora_rank`` on those layers trains and :meth:`standalone_network` merges it.

    Args:
        denoiser: The role's denoiser (its network is frozen here, but for the K/V layers or their adapters).
        lora_rank: 0 for full K/V copies, else the LoRA rank.
        lora_alpha: LoRA alpha (``None``: the rank).

    Example:
        >>> student = CrossAttentionKV(load_denoiser("runs/dmd/student"))
        >>> sum(p.numel() for p in student.parameters())  # the K/V weights only
    """

    def __init__(self, denoiser: Denoiser, lora_rank: int = 0, lora_alpha: float | None = None) -> None:
        super().__init__()
        network = denoiser.model
        names = cross_attention_kv_names(network)
        if not names:
            raise ValueError(
                f"{type(network).__name__} has no cross-attention layers: EchoDistill personalizes text-conditioned "
                "networks (UNet2DConditionModel with cross_attention_dim)."
            )
        network.requires_grad_(False)
        if lora_rank > 0:
            from peft import LoraConfig, inject_adapter_in_model

            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, target_modules=names,
                                init_lora_weights=True)
            inject_adapter_in_model(config, network, adapter_name=KV_ADAPTER)
            for n, p in network.named_parameters():
                p.requires_grad_(f".{KV_ADAPTER}." in n and "lora_" in n)
        else:
            for name in names:
                network.get_submodule(name).requires_grad_(True)
        self.__dict__["denoiser"] = denoiser  # not registered: its frozen weights are not this module's state
        self.lora_rank = lora_rank
        self.layers = nn.ModuleDict({name.replace(".", "__"): network.get_submodule(name) for name in names})

    @property
    def denoiser(self) -> Denoiser:
        """The wrapped denoiser (the whole network)."""
        return self.__dict__["denoiser"]

    @property
    def schedule(self):
        """The denoiser's noise schedule."""
        return self.denoiser.schedule

    def _apply(self, fn, recurse: bool = True):
        self.denoiser._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> CrossAttentionKV:
        """Set the mode of this module and of the wrapped network (no dropout in these networks' eval mode)."""
        self.denoiser.train(mode)
        return super().train(mode)

    def forward(self, x_t: torch.Tensor, t: Any, cond: Any = None) -> DenoiserOutput:
        """The denoiser's output ``D(x_t, t, cond)``."""
        return self.denoiser(x_t, t, cond)

    def standalone_network(self) -> nn.Module:
        """A plain fp32 copy of the network with the trained K/V in place (the LoRA adapter merged)."""
        if self.lora_rank > 0:
            from ..adapters import merge_adapter

            net = merge_adapter(self.denoiser.model, KV_ADAPTER)
        else:
            net = copy.deepcopy(self.denoiser.model).float()
        return net.requires_grad_(False).eval()


__all__ = ["KV_ADAPTER", "CrossAttentionKV", "NewTokenEmbedding", "cross_attention_kv_names"]
