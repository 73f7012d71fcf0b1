"""Registers the pure-PyTorch ops under the compiled library's names (used only when it is missing).

The schemas are those of csrc/ops.cpp with the sampling ops of CONTRACT.md section 2, so the rest
of the package (torch.ops.imi_softmax.*, the fakes and autograd of _ops.py) runs unchanged.
"""
import torch

from . import cells, loss, multilabel, optim, proposal, search

_SAMPLE_TAIL = ("Tensor? targets=None, Tensor? beta=None, Tensor? code1=None, Tensor? code2=None) -> "
                "(Tensor ids, Tensor log_q, Tensor target_log_q)")
_TABLES = ("Tensor s1, Tensor s2, Tensor log_n, Tensor cell_mass, Tensor log_n_max, Tensor offsets, "
           "Tensor class_ids, Tensor? alias_prob, Tensor? alias_pos, Tensor? beta_csr, int num_samples, ")

SCHEMAS = {
    "assign_codewords": ("assign_codewords(Tensor x, Tensor centroids) -> (Tensor codes, Tensor sqdist)",
                         cells.assign_codewords),
    "assign_rows": ("assign_rows(Tensor weight, Tensor rows, Tensor codebook1, Tensor codebook2, bool residual) -> "
                    "(Tensor code1, Tensor code2, Tensor finite)", cells.assign_rows),
    "build_cells": ("build_cells(Tensor code1, Tensor code2, Tensor? beta, int num_codewords) -> "
                    "(Tensor offsets, Tensor class_ids, Tensor alias_prob, Tensor alias_pos, Tensor beta_csr, "
                    "Tensor log_n, Tensor cell_mass, Tensor log_n_max)", cells.build_cells),
    "update_cells": ("update_cells(Tensor offsets, Tensor class_ids, Tensor? alias_prob, Tensor? alias_pos, "
                     "Tensor? beta_csr, Tensor log_n, Tensor cell_mass, Tensor log_n_max, Tensor code1, "
                     "Tensor code2, Tensor? beta, Tensor changed, Tensor new_code1, Tensor new_code2, "
                     "Tensor? new_beta, int num_codewords) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
                     "Tensor, Tensor, Tensor, Tensor, Tensor)", cells.update_cells),
    "update_cells_": ("update_cells_(Tensor(a!) offsets, Tensor(b!) class_ids, Tensor(c!)? alias_prob, "
                      "Tensor(d!)? alias_pos, Tensor(e!)? beta_csr, Tensor(f!) log_n, Tensor(g!) cell_mass, "
                      "Tensor(h!) log_n_max, Tensor(i!) code1, Tensor(j!) code2, Tensor(k!)? beta, Tensor changed, "
                      "Tensor new_code1, Tensor new_code2, Tensor? new_beta, int num_codewords) -> ()",
                      cells.update_cells_),
    "midx_sample": ("midx_sample(" + _TABLES + "Generator? generator, " + _SAMPLE_TAIL, proposal.midx_sample),
    "midx_sample_seeded": ("midx_sample_seeded(" + _TABLES + "int seed, int offset, " + _SAMPLE_TAIL,
                           proposal.midx_sample_seeded),
    "midx_log_prob": ("midx_log_prob(Tensor s1, Tensor s2, Tensor log_n, Tensor cell_mass, Tensor log_n_max, "
                      "Tensor? beta, Tensor code1, Tensor code2, Tensor ids) -> Tensor", proposal.midx_log_prob),
    "midx_search_cells": ("midx_search_cells(Tensor s1, Tensor s2, Tensor offsets, int budget) -> "
                          "(Tensor cells, Tensor num_candidates)", search.midx_search_cells),
    "midx_search": ("midx_search(Tensor query, Tensor weight, Tensor? bias, Tensor s1, Tensor s2, Tensor offsets, "
                    "Tensor class_ids, int k, int budget, str rerank=\"auto\") -> (Tensor ids, Tensor scores)",
                    search.midx_search),
    "sampled_softmax_forward": ("sampled_softmax_forward(Tensor x, Tensor weight, Tensor? bias, Tensor ids, "
                                "Tensor log_q, bool remove_accidental_hits, int ignore_index, bool sparse_grad) -> "
                                "(Tensor loss, Tensor lse)", loss.sampled_softmax_forward),
    "sampled_softmax_train": ("sampled_softmax_train(Tensor x, Tensor weight, Tensor? bias, Tensor ids, "
                              "Tensor log_q, bool remove_accidental_hits, int ignore_index, bool sparse_grad) -> "
                              "(Tensor loss, Tensor lse, Tensor coef, Tensor grad_x)", loss.sampled_softmax_train),
    "sampled_softmax_backward": ("sampled_softmax_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor? bias, "
                                 "Tensor ids, Tensor log_q, Tensor lse, bool remove_accidental_hits, "
                                 "int ignore_index) -> (Tensor grad_x, Tensor coef)", loss.sampled_softmax_backward),
    "multilabel_softmax_forward": ("multilabel_softmax_forward(Tensor x, Tensor weight, Tensor? bias, Tensor ids, "
                                   "Tensor log_q, int num_positives, bool remove_accidental_hits, bool sparse_grad) -> "
                                   "(Tensor loss, Tensor lse)", multilabel.multilabel_softmax_forward),
    "multilabel_softmax_train": ("multilabel_softmax_train(Tensor x, Tensor weight, Tensor? bias, Tensor ids, "
                                 "Tensor log_q, Tensor pos_weight, int num_positives, bool remove_accidental_hits, "
                                 "bool sparse_grad) -> (Tensor row_loss, Tensor coef, Tensor grad_x)",
                                 multilabel.multilabel_softmax_train),
    "multilabel_softmax_backward": ("multilabel_softmax_backward(Tensor grad_loss, Tensor x, Tensor weight, "
                                    "Tensor? bias, Tensor ids, Tensor log_q, Tensor lse, int num_positives, "
                                    "bool remove_accidental_hits) -> (Tensor grad_x, Tensor coef)",
                                    multilabel.multilabel_softmax_backward),
    "dense_weight_grad": ("dense_weight_grad(Tensor coef, Tensor ids, Tensor x, int num_classes) -> "
                          "(Tensor grad_weight, Tensor grad_bias)", loss.dense_weight_grad),
    "sparse_weight_grad": ("sparse_weight_grad(Tensor coef, Tensor ids, Tensor x, int num_classes) -> "
                           "(Tensor unique_ids, Tensor grad_weight_rows, Tensor grad_bias_rows)",
                           loss.sparse_weight_grad),
    "row_sparse_adam_": ("row_sparse_adam_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor? rows, "
                         "Tensor grad, float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()",
                         optim.row_sparse_adam_),
    "row_wise_adagrad_": ("row_wise_adagrad_(Tensor(a!) param, Tensor(b!) sum, Tensor? rows, Tensor grad, float lr, "
                          "float eps, float weight_decay) -> ()", optim.row_wise_adagrad_),
}

_LIBRARY = None  # the registrations live as long as this object


def register() -> None:
    """Defines every op of the imi_softmax namespace with a pure-PyTorch CPU and CUDA kernel (once)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    lib = torch.library.Library("imi_softmax", "DEF")
    for name, (schema, fn) in SCHEMAS.items():
        lib.define(schema)
        for key in ("CPU", "CUDA"):
            lib.impl(name, fn, key)
    _LIBRARY = lib
