"""Corrupted but well-typed inputs for the raw ops (imi_softmax.ops), as test_corrupt_op_inputs.py runs
them: bad CSR offsets, class ids, alias positions and probabilities, masses, codes, ids, row ids, sizes,
empty and expanded tensors. SETUP builds a small valid index and call helpers; CASES maps a name to
(expect, code): "err" must raise a Python exception, "ok" must return, "?" may do either (a corrupt
value the ops do not check, listed in the stop notes); under the sanitizer build
(scripts/sanitize_check.sh) none may touch memory out of bounds. First written as the fuzz of the
first ASan + UBSan run (312 cases, one process each)."""

SETUP = r'''
import torch
from imi_softmax import MIDXSampler, ops
N, D, K, B, M = 20, 6, 4, 3, 5
g = torch.Generator().manual_seed(0)
w = torch.randn(N, D, generator=g); bias = torch.randn(N, generator=g)
s = MIDXSampler(K, kmeans_iters=2).build(w, bias)
q = torch.randn(B, D, generator=g)
s1, s2 = [t.contiguous() for t in s.scores(q)]
I = dict(log_n=s.log_n, cell_mass=s.cell_mass, log_n_max=s.log_n_max, offsets=s.offsets, class_ids=s.class_ids,
         alias_prob=s.alias_prob, alias_pos=s.alias_pos, beta_csr=s.beta_csr)
def SA(**o):
    a = dict(s1=s1, s2=s2, **I); a.update(o); return list(a.values())
def sample(m=M, **o):
    return ops.midx_sample_seeded(*SA(**o), m, 7, 0)
def sample_t(targets, beta=None, code1=None, code2=None, m=M, **o):
    return ops.midx_sample_seeded(*SA(**o), m, 7, 0, targets, s.beta if beta is None else beta,
                                  s.code1 if code1 is None else code1, s.code2 if code2 is None else code2)
def LP(ids, **o):
    a = dict(s1=s1, s2=s2, log_n=s.log_n, cell_mass=s.cell_mass, log_n_max=s.log_n_max, beta=s.beta,
             code1=s.code1, code2=s.code2); a.update(o); return ops.midx_log_prob(*a.values(), ids)
def mod(t, i, v):
    t = t.clone(); t[i] = v; return t
def UC(inplace=False, **o):
    a = dict(offsets=s.offsets, class_ids=s.class_ids, alias_prob=s.alias_prob, alias_pos=s.alias_pos,
             beta_csr=s.beta_csr, log_n=s.log_n, cell_mass=s.cell_mass, log_n_max=s.log_n_max, code1=s.code1,
             code2=s.code2, beta=s.beta, changed=torch.tensor([2, 5]), new_code1=torch.tensor([1, 3], dtype=torch.int32),
             new_code2=torch.tensor([0, 2], dtype=torch.int32), new_beta=torch.tensor([0.5, -0.5]))
    a.update(o)
    if inplace:
        a = {k: (v.clone() if isinstance(v, torch.Tensor) and k in ("offsets","class_ids","alias_prob","alias_pos","beta_csr","log_n","cell_mass","log_n_max","code1","code2","beta") else v) for k, v in a.items()}
        return ops.update_cells_(*a.values(), K)
    return ops.update_cells(*a.values(), K)
# loss inputs
x = torch.randn(B, D, generator=g)
ids = torch.randint(0, N, (B, 1 + M), generator=g)
lq = torch.randn(B, 1 + M, generator=g)
def SF(fn="forward", **o):
    a = dict(x=x, weight=w, bias=bias, ids=ids, log_q=lq); a.update(o); a.pop("grad_loss", None); a.pop("lse", None)
    if fn == "forward": return ops.sampled_softmax_forward(*a.values(), True, -1, False)
    if fn == "train": return ops.sampled_softmax_train(*a.values(), True, -1, False)
    gl = o.get("grad_loss", torch.ones(a["x"].shape[0])); lse = o.get("lse", torch.zeros(a["x"].shape[0]))
    return ops.sampled_softmax_backward(gl, *a.values(), lse, True, -1)
L = 2
mids = torch.cat([torch.randint(0, N, (B, L), generator=g), torch.randint(0, N, (B, M), generator=g)], 1)
mlq = torch.randn(B, L + M, generator=g)
def ML(fn="forward", npos=L, **o):
    a = dict(x=x, weight=w, bias=bias, ids=mids, log_q=mlq); a.update(o)
    Bx = a["x"].shape[0]
    if fn == "forward": return ops.multilabel_softmax_forward(*a.values(), npos, True, False)
    if fn == "train":
        pw = o.get("pos_weight", torch.ones(Bx, npos)); a.pop("pos_weight", None)
        return ops.multilabel_softmax_train(*a.values(), pw, npos, True, False)
    gl = o.get("grad_loss", torch.ones(Bx, npos)); lse = o.get("lse", torch.zeros(Bx, npos))
    a.pop("grad_loss", None); a.pop("lse", None)
    return ops.multilabel_softmax_backward(gl, *a.values(), lse, npos, True)
coef = torch.randn(B, 1 + M, generator=g)
def WG(sparse=False, c=None, i=None, xx=None, n=N):
    f = ops.sparse_weight_grad if sparse else ops.dense_weight_grad
    return f(coef if c is None else c, ids if i is None else i, x if xx is None else xx, n)
def ADAM(p=None, m=None, v=None, rows=torch.tensor([1, 4, 7]), gr=None, step=1):
    p = w.clone() if p is None else p
    m = torch.zeros_like(p) if m is None else m; v = torch.zeros_like(p) if v is None else v
    gr = torch.randn(rows.numel() if rows is not None else p.shape[0], *p.shape[1:]) if gr is None else gr
    ops.row_sparse_adam_(p, m, v, rows, gr, 0.1, 0.9, 0.999, 1e-8, 0.0, step)
    return p
def ADA(p=None, sm=None, rows=torch.tensor([1, 4, 7]), gr=None):
    p = w.clone() if p is None else p
    sm = torch.zeros(p.shape[0]) if sm is None else sm
    gr = torch.randn(rows.numel() if rows is not None else p.shape[0], *p.shape[1:]) if gr is None else gr
    ops.row_wise_adagrad_(p, sm, rows, gr, 0.1, 1e-8, 0.0)
    return p
cb1 = torch.randn(K, D, generator=g); cb2 = torch.randn(K, D, generator=g)
def AR(weight=w, rows=torch.tensor([0, 3, 19]), c1=cb1, c2=cb2, residual=True):
    return ops.assign_rows(weight, rows, c1, c2, residual)
def SRCH(k=3, budget=8, rerank="auto", **o):
    a = dict(query=q, weight=w, bias=bias, s1=s1, s2=s2, offsets=s.offsets, class_ids=s.class_ids); a.update(o)
    return ops.midx_search(*a.values(), k, budget, rerank)
'''

# name: (expect, code). expect: "err" an error is due, "ok" must succeed, "?" either (judge by hand)
BIG = "2**62"
CASES = {
# ---- midx_sample(_seeded) ----
"smp_valid": ("ok", "sample()"),
"smp_off_nonmono": ("err", "o=s.offsets.clone(); o[5]=o[6]+3; sample(offsets=o)"),
"smp_off_first1": ("err", "sample(offsets=mod(s.offsets,0,1))"),
"smp_off_lastbig": ("err", "sample(offsets=mod(s.offsets,-1,N+5))"),
"smp_off_huge_mid": ("err", "o=s.offsets.clone(); o[3:]=2**62; o[-1]=N; sample(offsets=o)"),
"smp_off_neg_mid": ("err", "o=s.offsets.clone(); o[3]=-5; sample(offsets=o)"),
"smp_off_int32": ("err", "sample(offsets=s.offsets.int())"),
"smp_off_noncontig": ("?", "o=torch.stack([s.offsets,s.offsets],1)[:,0]; sample(offsets=o)"),
"smp_off_short": ("err", "sample(offsets=s.offsets[:-1])"),
"smp_cid_oob": ("err", "r=sample(class_ids=torch.full((N,),1000,dtype=torch.int32)); print(r[0])"),
"smp_cid_neg": ("err", "r=sample(class_ids=torch.full((N,),-7,dtype=torch.int32)); print(r[0])"),
"smp_cid_int64": ("err", "sample(class_ids=s.class_ids.long())"),
"smp_cid_empty": ("err", "sample(offsets=torch.zeros(K*K+1,dtype=torch.long), class_ids=torch.zeros(0,dtype=torch.int32), alias_prob=None, alias_pos=None, beta_csr=None)"),
"smp_cid_noncontig": ("err", "sample(class_ids=torch.stack([s.class_ids]*2,1)[:,0])"),
"smp_apos_oob": ("err", "sample(m=200, alias_pos=torch.full((N,),10**6,dtype=torch.int32), alias_prob=torch.zeros(N))"),
"smp_apos_neg": ("err", "sample(m=200, alias_pos=torch.full((N,),-1,dtype=torch.int32), alias_prob=torch.zeros(N))"),
"smp_apos_int32max": ("err", "sample(m=200, alias_pos=torch.full((N,),2**31-1,dtype=torch.int32), alias_prob=torch.zeros(N))"),
"smp_aprob_nan": ("?", "r=sample(m=50, alias_prob=torch.full((N,),float('nan'))); print(r[0][0])"),
"smp_aprob_short": ("err", "sample(alias_prob=s.alias_prob[:-1])"),
"smp_apos_short": ("err", "sample(alias_pos=s.alias_pos[:-1])"),
"smp_bcsr_short": ("err", "sample(beta_csr=s.beta_csr[:-1])"),
"smp_bcsr_long": ("err", "sample(beta_csr=torch.cat([s.beta_csr,s.beta_csr]))"),
"smp_alias_partial": ("err", "sample(alias_prob=None)"),
"smp_bcsr_f64": ("err", "sample(beta_csr=s.beta_csr.double())"),
"smp_cmass_short": ("err", "sample(cell_mass=s.cell_mass.reshape(-1)[:-1])"),
"smp_logn_long": ("err", "sample(log_n=torch.zeros(K*K+1))"),
"smp_lognmax_2": ("err", "sample(log_n_max=torch.zeros(2))"),
"smp_lognmax_0": ("err", "sample(log_n_max=torch.zeros(0))"),
"smp_cmass_nan": ("?", "r=sample(cell_mass=torch.full((K,K),float('nan'))); print(r)"),
"smp_cmass_neg": ("?", "r=sample(cell_mass=-s.cell_mass); print(r[0])"),
"smp_cmass_inf": ("?", "r=sample(cell_mass=torch.full((K,K),float('inf'))); print(r[0])"),
"smp_cmass_empty_cells": ("err", "o=torch.zeros(K*K+1,dtype=torch.long); o[1:]=N; sample(m=100, offsets=o, cell_mass=torch.ones(K,K))"),
"smp_cmass_noncontig": ("err", "sample(cell_mass=s.cell_mass.t())"),
"smp_B0": ("ok", "r=sample(s1=s1[:0], s2=s2[:0]); assert r[0].shape==(0,M)"),
"smp_M0": ("ok", "r=sample(m=0); assert r[0].shape==(B,0)"),
"smp_Mhuge": ("err", "sample(m=2**62)"),
"smp_Mneg": ("err", "sample(m=-1)"),
"smp_s1_noncontig": ("ok", "sample(s1=s1.t().contiguous().t(), s2=s2.t().contiguous().t())"),
"smp_s1_expanded": ("ok", "sample(s1=s1[:1].expand(B,K), s2=s2[:1].expand(B,K))"),
"smp_s1_f64": ("err", "sample(s1=s1.double(), s2=s2.double())"),
"smp_K_mismatch": ("err", "sample(s1=torch.randn(B,K+1), s2=torch.randn(B,K+1))"),
"smp_K0": ("err", "sample(s1=torch.randn(B,0), s2=torch.randn(B,0))"),
"smp_tgt_oob": ("err", "sample_t(torch.full((B,2),N))"),
"smp_tgt_huge": ("err", "sample_t(torch.full((B,2),2**62))"),
"smp_tgt_neg_ok": ("ok", "r=sample_t(torch.full((B,2),-3)); assert (r[2]==0).all()"),
"smp_tgt_code_oob": ("err", "sample_t(torch.full((B,2),3), code1=mod(s.code1,3,K))"),
"smp_tgt_code_neg": ("err", "sample_t(torch.full((B,2),3), code2=mod(s.code2,3,-1))"),
"smp_tgt_code_other_oob": ("ok", "sample_t(torch.full((B,2),3), code1=mod(s.code1,4,K))"),
"smp_tgt_int32": ("err", "sample_t(torch.zeros(B,2,dtype=torch.int32))"),
"smp_tgt_wrongB": ("err", "sample_t(torch.zeros(B+1,2,dtype=torch.long))"),
"smp_tgt_code1_short": ("err", "sample_t(torch.zeros(B,2,dtype=torch.long), code1=s.code1[:-1])"),
"smp_tgt_beta_short": ("err", "sample_t(torch.zeros(B,2,dtype=torch.long), beta=s.beta[:-1])"),
"smp_tgt_noncontig": ("ok", "sample_t(torch.zeros(2,B,dtype=torch.long).t())"),
"smp_tgt_expanded": ("ok", "sample_t(torch.zeros(1,2,dtype=torch.long).expand(B,2))"),
"smp_offset_not4": ("err", "ops.midx_sample_seeded(*SA(), M, 7, 3)"),
"smp_offset_neg": ("err", "ops.midx_sample_seeded(*SA(), M, 7, -4)"),
"smp_offset_wrap": ("ok", "ops.midx_sample_seeded(*SA(), M, -1, 2**63-4)"),
"smp_gen": ("ok", "ops.midx_sample(*SA(), M, None)"),
"smp_gen_cid_oob": ("err", "r=ops.midx_sample(*SA(class_ids=torch.full((N,),5000,dtype=torch.int32)), M, None); print(r[0])"),
# ---- midx_log_prob ----
"lp_valid": ("ok", "LP(torch.zeros(B,2,dtype=torch.long))"),
"lp_ids_oob": ("err", "LP(torch.full((B,2),N))"),
"lp_ids_neg": ("err", "LP(torch.full((B,2),-1))"),
"lp_ids_min": ("err", "LP(torch.full((B,2),-2**63))"),
"lp_code_oob": ("err", "LP(torch.full((B,2),3), code1=mod(s.code1,3,K))"),
"lp_code_neg": ("err", "LP(torch.full((B,2),3), code2=mod(s.code2,3,-100))"),
"lp_code_i64": ("err", "LP(torch.zeros(B,2,dtype=torch.long), code1=s.code1.long())"),
"lp_beta_short": ("err", "LP(torch.zeros(B,2,dtype=torch.long), beta=s.beta[:-1])"),
"lp_ids_i32": ("err", "LP(torch.zeros(B,2,dtype=torch.int32))"),
"lp_ids_wrongB": ("err", "LP(torch.zeros(B+1,2,dtype=torch.long))"),
"lp_L0": ("ok", "LP(torch.zeros(B,0,dtype=torch.long))"),
"lp_B0": ("ok", "LP(torch.zeros(0,2,dtype=torch.long), s1=s1[:0], s2=s2[:0])"),
"lp_empty_codes_ids": ("err", "LP(torch.zeros(B,1,dtype=torch.long), code1=s.code1[:0], code2=s.code2[:0], beta=None)"),
"lp_ids_expanded": ("ok", "LP(torch.tensor([[1,2]]).expand(B,2))"),
"lp_code_noncontig": ("err", "LP(torch.zeros(B,1,dtype=torch.long), code1=torch.stack([s.code1]*2,1)[:,0])"),
"lp_cmass_short": ("err", "LP(torch.zeros(B,1,dtype=torch.long), cell_mass=torch.zeros(K*K-1))"),
# ---- build_cells ----
"bc_valid": ("ok", "ops.build_cells(s.code1, s.code2, s.beta, K)"),
"bc_code_oob": ("err", "ops.build_cells(mod(s.code1,0,K), s.code2, None, K)"),
"bc_code_neg": ("err", "ops.build_cells(s.code1, mod(s.code2,7,-1), s.beta, K)"),
"bc_K0": ("err", "ops.build_cells(s.code1, s.code2, None, 0)"),
"bc_Kbig": ("err", "ops.build_cells(s.code1, s.code2, None, 2**40)"),
"bc_Kneg": ("err", "ops.build_cells(s.code1, s.code2, None, -3)"),
"bc_len_mismatch": ("err", "ops.build_cells(s.code1, s.code2[:-1], None, K)"),
"bc_beta_short": ("err", "ops.build_cells(s.code1, s.code2, s.beta[:-1], K)"),
"bc_N0": ("err", "r=ops.build_cells(s.code1[:0], s.code2[:0], None, K); print(r)"),
"bc_N0_beta": ("err", "r=ops.build_cells(s.code1[:0], s.code2[:0], torch.zeros(0), K); print(r)"),
"bc_beta_nan": ("err", "r=ops.build_cells(s.code1, s.code2, torch.full((N,),float('nan')), K); print(r[2], r[3], r[6])"),
"bc_beta_inf": ("err", "r=ops.build_cells(s.code1, s.code2, mod(s.beta,0,float('inf')), K); print(r[2], r[3], r[6])"),
"bc_beta_neginf": ("err", "r=ops.build_cells(s.code1, s.code2, torch.full((N,),float('-inf')), K); print(r[2], r[3], r[6], r[7])"),
"bc_beta_huge": ("?", "r=ops.build_cells(s.code1, s.code2, torch.full((N,),3e38), K); print(r[2], r[6], r[7])"),
"bc_noncontig": ("ok", "ops.build_cells(torch.stack([s.code1]*2,1)[:,0], s.code2, s.beta, K)"),
"bc_expanded": ("ok", "ops.build_cells(torch.zeros(1,dtype=torch.int32).expand(N), s.code2, torch.zeros(1).expand(N), K)"),
"bc_int64": ("err", "ops.build_cells(s.code1.long(), s.code2.long(), None, K)"),
"bc_2d": ("err", "ops.build_cells(s.code1.reshape(4,5), s.code2.reshape(4,5), None, K)"),
# ---- update_cells / update_cells_ ----
"uc_valid": ("ok", "UC()"),
"uc_valid_inplace": ("ok", "UC(True)"),
"uc_changed_oob": ("err", "UC(changed=torch.tensor([2, N]))"),
"uc_changed_oob_ip": ("err", "UC(True, changed=torch.tensor([2, N]))"),
"uc_changed_neg": ("err", "UC(changed=torch.tensor([-1, 5]))"),
"uc_changed_neg_ip": ("err", "UC(True, changed=torch.tensor([-1, 5]))"),
"uc_changed_unsorted": ("err", "UC(changed=torch.tensor([5, 2]))"),
"uc_changed_unsorted_ip": ("err", "UC(True, changed=torch.tensor([5, 2]))"),
"uc_changed_dup": ("err", "UC(changed=torch.tensor([5, 5]))"),
"uc_changed_dup_ip": ("err", "UC(True, changed=torch.tensor([5, 5]))"),
"uc_newcode_oob": ("err", "UC(new_code1=torch.tensor([1, K], dtype=torch.int32))"),
"uc_newcode_oob_ip": ("err", "UC(True, new_code1=torch.tensor([1, K], dtype=torch.int32))"),
"uc_newcode_neg_ip": ("err", "UC(True, new_code2=torch.tensor([-1, 0], dtype=torch.int32))"),
"uc_oldcode_oob": ("?", "UC(code1=mod(s.code1,9,K))"),
"uc_oldcode_oob_ip": ("?", "UC(True, code1=mod(s.code1,9,K))"),
"uc_oldcode_oob_changed": ("?", "UC(code1=mod(s.code1,2,K))"),
"uc_oldcode_oob_changed_ip": ("?", "UC(True, code1=mod(s.code1,2,K))"),
"uc_cid_oob": ("err", "UC(class_ids=mod(s.class_ids,4,1000))"),
"uc_cid_oob_ip": ("err", "UC(True, class_ids=mod(s.class_ids,4,1000))"),
"uc_cid_neg": ("err", "UC(class_ids=mod(s.class_ids,4,-1))"),
"uc_cid_neg_ip": ("err", "UC(True, class_ids=mod(s.class_ids,4,-1))"),
"uc_cid_dup": ("?", "c=s.class_ids.clone(); c[:]=c[0]; UC(class_ids=c)"),
"uc_cid_dup_ip": ("?", "c=s.class_ids.clone(); c[:]=c[0]; UC(True, class_ids=c)"),
"uc_cid_reversed": ("?", "UC(class_ids=s.class_ids.flip(0).contiguous())"),
"uc_cid_reversed_ip": ("?", "UC(True, class_ids=s.class_ids.flip(0).contiguous())"),
"uc_off_inconsistent": ("?", "o=torch.zeros(K*K+1,dtype=torch.long); o[1:]=N; UC(offsets=o)"),
"uc_off_inconsistent_ip": ("?", "o=torch.zeros(K*K+1,dtype=torch.long); o[1:]=N; UC(True, offsets=o)"),
"uc_off_inconsistent2_ip": ("?", "o=torch.zeros(K*K+1,dtype=torch.long); o[-1]=N; UC(True, offsets=o)"),
"uc_off_nonmono": ("err", "o=s.offsets.clone(); o[5]=o[6]+3; UC(offsets=o)"),
"uc_off_nonmono_ip": ("err", "o=s.offsets.clone(); o[5]=o[6]+3; UC(True, offsets=o)"),
"uc_apos_oob": ("?", "UC(alias_pos=torch.full((N,),10**6,dtype=torch.int32))"),
"uc_apos_oob_ip": ("?", "UC(True, alias_pos=torch.full((N,),10**6,dtype=torch.int32))"),
"uc_beta_short": ("err", "UC(beta=s.beta[:-1])"),
"uc_newbeta_short_ip": ("err", "UC(True, new_beta=torch.tensor([0.5]))"),
"uc_newbeta_nan": ("err", "UC(new_beta=torch.tensor([0.5, float('nan')]))"),
"uc_newbeta_nan_ip": ("err", "UC(True, new_beta=torch.tensor([0.5, float('nan')]))"),
"uc_newbeta_inf_ip": ("err", "UC(True, new_beta=torch.tensor([float('inf'), 0.5]))"),
"uc_newbeta_neginf": ("err", "UC(new_beta=torch.tensor([0.5, float('-inf')]))"),
"uc_C0": ("ok", "UC(changed=torch.zeros(0,dtype=torch.long), new_code1=torch.zeros(0,dtype=torch.int32), new_code2=torch.zeros(0,dtype=torch.int32), new_beta=torch.zeros(0))"),
"uc_C0_ip": ("ok", "UC(True, changed=torch.zeros(0,dtype=torch.long), new_code1=torch.zeros(0,dtype=torch.int32), new_code2=torch.zeros(0,dtype=torch.int32), new_beta=torch.zeros(0))"),
"uc_all_changed_ip": ("ok", "UC(True, changed=torch.arange(N), new_code1=torch.zeros(N,dtype=torch.int32), new_code2=torch.full((N,),K-1,dtype=torch.int32), new_beta=torch.zeros(N))"),
"uc_nobias_ip": ("ok", "UC(True, alias_prob=None, alias_pos=None, beta_csr=None, beta=None, new_beta=None)"),
"uc_changed_huge_ip": ("err", "UC(True, changed=torch.tensor([2, 2**62]))"),
"uc_lognmax_2": ("err", "UC(True, log_n_max=torch.zeros(2))"),
# ---- search ----
"sc_valid": ("ok", "ops.midx_search_cells(s1, s2, s.offsets, 5)"),
"sc_off_nonmono": ("err", "o=s.offsets.clone(); o[5]=o[6]+3; ops.midx_search_cells(s1, s2, o, 5)"),
"sc_off_neg_last": ("err", "o=s.offsets.clone(); o[-1]=-5; ops.midx_search_cells(s1, s2, o, 5)"),
"sc_off_huge": ("?", "o=s.offsets.clone(); o[2:]=2**62; ops.midx_search_cells(s1, s2, o, 5)"),
"sc_off_int32": ("err", "ops.midx_search_cells(s1, s2, s.offsets.int(), 5)"),
"sc_off_noncontig": ("?", "ops.midx_search_cells(s1, s2, torch.stack([s.offsets]*2,1)[:,0], 5)"),
"sc_budget0": ("err", "ops.midx_search_cells(s1, s2, s.offsets, 0)"),
"sc_budget_huge": ("ok", "ops.midx_search_cells(s1, s2, s.offsets, 2**62)"),
"sc_B0": ("ok", "ops.midx_search_cells(s1[:0], s2[:0], s.offsets, 5)"),
"sc_nan_scores": ("err", "ops.midx_search_cells(torch.full((B,K),float('nan')), s2, s.offsets, 5)"),
"sc_one_nan_score": ("err", "t=s1.clone(); t[1,2]=float('nan'); ops.midx_search_cells(t, s2, s.offsets, 5)"),
"sc_inf_score": ("err", "t=s2.clone(); t[0,0]=float('inf'); ops.midx_search_cells(s1, t, s.offsets, 5)"),
"sr_valid": ("ok", "SRCH(); SRCH(rerank='cell'); SRCH(rerank='query')"),
"sr_cid_oob_q": ("err", "SRCH(rerank='query', budget=N, class_ids=mod(s.class_ids,3,N))"),
"sr_cid_oob_c": ("err", "SRCH(rerank='cell', budget=N, class_ids=mod(s.class_ids,3,N))"),
"sr_cid_neg_q": ("err", "SRCH(rerank='query', budget=N, class_ids=mod(s.class_ids,3,-1))"),
"sr_cid_neg_c": ("err", "SRCH(rerank='cell', budget=N, class_ids=mod(s.class_ids,3,-1))"),
"sr_cid64_oob_c": ("err", "SRCH(rerank='cell', budget=N, class_ids=mod(s.class_ids.long(),3,2**40))"),
"sr_cid_dup_c": ("?", "c=s.class_ids.clone(); c[:]=0; print(SRCH(rerank='cell', k=5, budget=N, class_ids=c))"),
"sr_cid_dup_q": ("?", "c=s.class_ids.clone(); c[:]=0; print(SRCH(rerank='query', k=5, budget=N, class_ids=c))"),
"sr_k_gt_N": ("err", "SRCH(k=N+1, budget=N+1)"),
"sr_k_neg": ("err", "SRCH(k=-1)"),
"sr_budget_lt_k": ("err", "SRCH(k=5, budget=4)"),
"sr_k0": ("ok", "SRCH(k=0, budget=0)"),
"sr_budget_huge": ("ok", "SRCH(k=3, budget=2**62, rerank='cell'); SRCH(k=3, budget=2**62, rerank='query')"),
"sr_kN_budget_small": ("?", "print(SRCH(k=N, budget=N, rerank='cell')); print(SRCH(k=N, budget=N, rerank='query'))"),
"sr_nan_scores_c": ("err", "print(SRCH(k=3, budget=5, rerank='cell', s1=torch.full((B,K),float('nan'))))"),
"sr_nan_scores_q": ("err", "print(SRCH(k=3, budget=5, rerank='query', s1=torch.full((B,K),float('nan'))))"),
"sr_one_nan_score": ("err", "t=s1.clone(); t[0,1]=float('nan'); SRCH(k=3, budget=5, s1=t)"),
"sr_neginf_score": ("err", "t=s2.clone(); t[1,0]=float('-inf'); SRCH(k=3, budget=5, s2=t)"),
"sr_weight_noncontig": ("ok", "SRCH(weight=w.t().contiguous().t(), rerank='cell')"),
"sr_weight_expanded": ("ok", "SRCH(weight=w[:1].expand(N,D), rerank='cell')"),
"sr_bias_wrong": ("err", "SRCH(bias=bias[:-1])"),
"sr_cid_short": ("err", "SRCH(class_ids=s.class_ids[:-1])"),
"sr_s1_rows": ("err", "SRCH(s1=s1[:1], s2=s2[:1])"),
"sr_d0": ("ok", "SRCH(query=torch.zeros(B,0), weight=torch.zeros(N,0), bias=None)"),
"sr_many_queries_cell": ("ok", "qq=torch.randn(300,D); a,b_=s.scores(qq); ops.midx_search(qq, w, bias, a.contiguous(), b_.contiguous(), s.offsets, s.class_ids, 4, 10, 'auto')"),
"sr_off_noncontig": ("?", "SRCH(offsets=torch.stack([s.offsets]*2,1)[:,0])"),
# ---- sampled softmax ----
"sf_valid": ("ok", "SF(); SF('train'); SF('backward')"),
"sf_ids_oob_col0": ("err", "SF(ids=mod(ids,(1,0),N))"),
"sf_ids_oob_colj": ("err", "SF(ids=mod(ids,(1,3),N))"),
"sf_ids_neg_colj": ("err", "SF(ids=mod(ids,(1,3),-1))"),
"sf_ids_min_col0": ("err", "SF(ids=mod(ids,(1,0),-2**63))"),
"sf_ids_max_colj_train": ("err", "SF('train', ids=mod(ids,(1,3),2**63-1))"),
"sf_ids_oob_bwd": ("err", "SF('backward', ids=mod(ids,(2,5),N+1))"),
"sf_ids_neg_bwd": ("err", "SF('backward', ids=mod(ids,(2,5),-5))"),
"sf_ignore_col0": ("ok", "SF(ids=mod(ids,(1,0),-1)); SF('train', ids=mod(ids,(1,0),-1)); SF('backward', ids=mod(ids,(1,0),-1))"),
"sf_ids_i32": ("err", "SF(ids=ids.int())"),
"sf_M0": ("err", "SF(ids=ids[:,:0], log_q=lq[:,:0])"),
"sf_B0": ("ok", "SF(x=x[:0], ids=ids[:0], log_q=lq[:0]); SF('train', x=x[:0], ids=ids[:0], log_q=lq[:0]); SF('backward', x=x[:0], ids=ids[:0], log_q=lq[:0])"),
"sf_N0": ("err", "SF(weight=w[:0], bias=bias[:0])"),
"sf_N0_all_ignored": ("?", "SF(weight=w[:0], bias=bias[:0], ids=torch.full((B,1),-1), log_q=lq[:,:1])"),
"sf_lq_shape": ("err", "SF(log_q=lq[:,:-1])"),
"sf_lq_dtype": ("err", "SF(log_q=lq.double())"),
"sf_x_noncontig": ("ok", "SF(x=x.t().contiguous().t()); SF('backward', x=x.t().contiguous().t())"),
"sf_w_expanded": ("ok", "SF(weight=w[:1].expand(N,D)); SF('train', weight=w[:1].expand(N,D))"),
"sf_ids_expanded": ("ok", "SF(ids=ids[:1].expand(B,1+M), log_q=lq[:1].expand(B,1+M))"),
"sf_bias_shape": ("err", "SF(bias=bias[:-1])"),
"sf_f16": ("ok", "SF(x=x.half(), weight=w.half(), bias=bias.half()); SF('backward', x=x.half(), weight=w.half(), bias=bias.half())"),
"sf_bf16_oob": ("err", "SF('train', x=x.bfloat16(), weight=w.bfloat16(), bias=bias.bfloat16(), ids=mod(ids,(0,2),N))"),
"sf_f64_lq32": ("err", "SF(x=x.double(), weight=w.double(), bias=bias.double())"),
"sf_d0": ("ok", "SF(x=x[:,:0], weight=w[:,:0]); SF('backward', x=x[:,:0], weight=w[:,:0])"),
"sf_bwd_gl_short": ("err", "SF('backward', grad_loss=torch.ones(B-1))"),
"sf_bwd_lse_int": ("err", "SF('backward', lse=torch.zeros(B,dtype=torch.long))"),
"sf_bwd_gl_2d": ("?", "SF('backward', grad_loss=torch.ones(B,1))"),
"sf_bwd_gl_expanded": ("ok", "SF('backward', grad_loss=torch.ones(1).expand(B))"),
# ---- multilabel ----
"ml_valid": ("ok", "ML(); ML('train'); ML('backward')"),
"ml_pad": ("ok", "ML(ids=mod(mids,(0,1),-1)); ML('train', ids=mod(mids,(0,1),-1)); ML('backward', ids=mod(mids,(0,1),-1))"),
"ml_pos_neg2": ("err", "ML(ids=mod(mids,(0,1),-2))"),
"ml_pos_oob": ("err", "ML('train', ids=mod(mids,(0,0),N))"),
"ml_neg_col_pad": ("err", "ML(ids=mod(mids,(0,L+1),-1))"),
"ml_neg_col_oob_bwd": ("err", "ML('backward', ids=mod(mids,(2,L+2),N+3))"),
"ml_neg_col_min_train": ("err", "ML('train', ids=mod(mids,(2,L+2),-2**63))"),
"ml_npos_big": ("err", "ML(npos=1+M+L)"),
"ml_npos_neg": ("err", "ML(npos=-1)"),
"ml_npos0": ("?", "print(ML(npos=0)); print(ML('train', npos=0)); print(ML('backward', npos=0))"),
"ml_npos_all": ("?", "print(ML(npos=L+M)); print(ML('train', npos=L+M)); print(ML('backward', npos=L+M))"),
"ml_all_pads": ("ok", "i=mids.clone(); i[:,:L]=-1; ML(ids=i); ML('train', ids=i); ML('backward', ids=i)"),
"ml_B0": ("ok", "ML(x=x[:0], ids=mids[:0], log_q=mlq[:0]); ML('train', x=x[:0], ids=mids[:0], log_q=mlq[:0]); ML('backward', x=x[:0], ids=mids[:0], log_q=mlq[:0])"),
"ml_pw_shape": ("err", "ML('train', pos_weight=torch.ones(B, L+1))"),
"ml_pw_dtype": ("err", "ML('train', pos_weight=torch.ones(B, L, dtype=torch.float64))"),
"ml_pw_expanded": ("ok", "ML('train', pos_weight=torch.ones(1, 1).expand(B, L))"),
"ml_bwd_gl_shape": ("err", "ML('backward', grad_loss=torch.ones(B, L+1))"),
"ml_bwd_lse_expanded": ("ok", "ML('backward', lse=torch.zeros(1,1).expand(B,L), grad_loss=torch.ones(1,1).expand(B,L))"),
"ml_ids_noncontig": ("ok", "ML(ids=mids.t().contiguous().t(), log_q=mlq.t().contiguous().t())"),
"ml_f16_oob": ("err", "ML('train', x=x.half(), weight=w.half(), bias=bias.half(), ids=mod(mids,(1,4),N))"),
"ml_d0": ("ok", "ML(x=x[:,:0], weight=w[:,:0]); ML('train', x=x[:,:0], weight=w[:,:0]); ML('backward', x=x[:,:0], weight=w[:,:0])"),
"ml_dup_pos": ("ok", "i=mids.clone(); i[:,1]=i[:,0]; ML(ids=i); ML('train', ids=i)"),
# ---- weight grads ----
"wg_valid": ("ok", "WG(); WG(True)"),
"wg_ids_oob": ("err", "WG(i=mod(ids,(1,2),N))"),
"wg_ids_oob_sp": ("err", "WG(True, i=mod(ids,(1,2),N))"),
"wg_ids_neg2": ("err", "WG(i=mod(ids,(1,2),-2))"),
"wg_ids_neg1": ("ok", "WG(i=mod(ids,(1,2),-1)); WG(True, i=mod(ids,(1,2),-1))"),
"wg_ids_min": ("err", "WG(True, i=mod(ids,(0,0),-2**63))"),
"wg_ids_oob_coef0": ("ok", "WG(i=mod(ids,(1,2),10**12), c=mod(coef,(1,2),0.0)); WG(True, i=mod(ids,(1,2),10**12), c=mod(coef,(1,2),0.0))"),
"wg_ids_oob_coefnan": ("err", "WG(i=mod(ids,(1,2),10**12), c=mod(coef,(1,2),float('nan')))"),
"wg_n_neg": ("err", "WG(n=-1)"),
"wg_n_overflow": ("err", "WG(n=2**62)"),
"wg_n_huge_dense": ("?", "WG(n=2**45)"),
"wg_n_huge_sparse": ("err", "WG(True, n=2**62)"),
"wg_n0": ("err", "WG(n=0)"),
"wg_n_max_sparse_highids": ("ok", "i=torch.full((B,1+M),2**50); print(WG(True, i=i, n=2**50+1)[0])"),
"wg_coef_shape": ("err", "WG(c=coef[:,:-1])"),
"wg_coef_dtype": ("err", "WG(c=coef.double())"),
"wg_x_rows": ("err", "WG(xx=x[:-1])"),
"wg_ids_i32": ("err", "WG(i=ids.int())"),
"wg_expanded": ("ok", "WG(i=ids[:1].expand(B,1+M), c=coef[:1].expand(B,1+M), xx=x[:1].expand(B,D)); WG(True, i=ids[:1].expand(B,1+M))"),
"wg_B0": ("ok", "WG(i=ids[:0], c=coef[:0], xx=x[:0]); WG(True, i=ids[:0], c=coef[:0], xx=x[:0])"),
"wg_M0": ("ok", "WG(i=ids[:,:0], c=coef[:,:0]); WG(True, i=ids[:,:0], c=coef[:,:0])"),
"wg_d0": ("ok", "WG(xx=x[:,:0]); WG(True, xx=x[:,:0])"),
"wg_f16": ("ok", "WG(xx=x.half()); WG(True, xx=x.bfloat16())"),
# ---- row optimizers ----
"ro_valid": ("ok", "ADAM(); ADA(); ADAM(rows=None); ADA(rows=None)"),
"ro_adam_rows_oob": ("err", "ADAM(rows=torch.tensor([1, 4, N]))"),
"ro_adam_rows_neg": ("err", "ADAM(rows=torch.tensor([-1, 4, 7]))"),
"ro_adam_rows_dup": ("err", "ADAM(rows=torch.tensor([1, 4, 4]))"),
"ro_adam_rows_unsorted": ("err", "ADAM(rows=torch.tensor([4, 1, 7]))"),
"ro_adam_rows_huge": ("err", "ADAM(rows=torch.tensor([1, 4, 2**62]))"),
"ro_adam_rows_i32": ("err", "ADAM(rows=torch.tensor([1, 4, 7], dtype=torch.int32))"),
"ro_adam_rows_2d": ("err", "ADAM(rows=torch.tensor([[1, 4, 7]]), gr=torch.randn(3, D))"),
"ro_adam_grad_rows": ("err", "ADAM(gr=torch.randn(2, D))"),
"ro_adam_grad_d": ("err", "ADAM(gr=torch.randn(3, D+1))"),
"ro_adam_state_shape": ("err", "ADAM(m=torch.zeros(N-1, D))"),
"ro_adam_state_noncontig": ("err", "ADAM(v=torch.zeros(D, N).t())"),
"ro_adam_state_f64": ("err", "ADAM(m=torch.zeros(N, D, dtype=torch.float64))"),
"ro_adam_param_noncontig": ("err", "ADAM(p=w.t().contiguous().t())"),
"ro_adam_param_expanded": ("err", "ADAM(p=w[:1].expand(N, D))"),
"ro_adam_param_f64": ("err", "ADAM(p=w.double(), m=torch.zeros(N,D), v=torch.zeros(N,D), gr=torch.randn(3,D,dtype=torch.float64))"),
"ro_adam_grad_expanded": ("ok", "ADAM(gr=torch.randn(1, D).expand(3, D))"),
"ro_adam_grad_noncontig": ("ok", "ADAM(gr=torch.randn(D, 3).t())"),
"ro_adam_rows_expanded": ("err", "ADAM(rows=torch.tensor([4]).expand(3))"),
"ro_adam_step0": ("err", "ADAM(step=0)"),
"ro_adam_bias": ("ok", "ADAM(p=bias.clone(), gr=torch.randn(3))"),
"ro_adam_bias_grad2d": ("err", "ADAM(p=bias.clone(), gr=torch.randn(3, 1))"),
"ro_adam_U0": ("ok", "ADAM(rows=torch.zeros(0, dtype=torch.long), gr=torch.zeros(0, D))"),
"ro_adam_N0": ("ok", "ADAM(p=torch.zeros(0, D), rows=torch.zeros(0, dtype=torch.long), gr=torch.zeros(0, D))"),
"ro_adam_N0_rows": ("err", "ADAM(p=torch.zeros(0, D), rows=torch.zeros(1, dtype=torch.long), gr=torch.zeros(1, D))"),
"ro_adam_dense_shape": ("err", "ADAM(rows=None, gr=torch.randn(N-1, D))"),
"ro_adam_bf16": ("ok", "ADAM(p=w.bfloat16(), m=torch.zeros(N, D), v=torch.zeros(N, D), gr=torch.randn(3, D).bfloat16())"),
"ro_adam_grad_dtype": ("err", "ADAM(p=w.bfloat16(), gr=torch.randn(3, D))"),
"ro_ada_rows_oob": ("err", "ADA(rows=torch.tensor([1, 4, N]))"),
"ro_ada_rows_neg": ("err", "ADA(rows=torch.tensor([-3, 4, 7]))"),
"ro_ada_rows_dup": ("err", "ADA(rows=torch.tensor([4, 4, 7]))"),
"ro_ada_sum_shape": ("err", "ADA(sm=torch.zeros(N-1))"),
"ro_ada_sum_2d": ("err", "ADA(sm=torch.zeros(N, D))"),
"ro_ada_sum_noncontig": ("err", "ADA(sm=torch.zeros(N, 2)[:, 0])"),
"ro_ada_bias": ("ok", "ADA(p=bias.clone(), gr=torch.randn(3))"),
"ro_ada_d0": ("ok", "ADA(p=torch.zeros(N, 0), gr=torch.zeros(3, 0))"),
# ---- assign_rows ----
"ar_valid": ("ok", "AR(); AR(c1=cb1[:, :2], c2=cb2[:, 2:], residual=False)"),
"ar_rows_oob": ("err", "AR(rows=torch.tensor([0, N]))"),
"ar_rows_neg": ("err", "AR(rows=torch.tensor([-1, 3]))"),
"ar_rows_huge": ("err", "AR(rows=torch.tensor([2**62]))"),
"ar_rows_i32": ("err", "AR(rows=torch.tensor([0, 3], dtype=torch.int32))"),
"ar_rows_2d": ("err", "AR(rows=torch.tensor([[0, 3]]))"),
"ar_rows_dup": ("ok", "AR(rows=torch.tensor([3, 3, 3]))"),
"ar_rows_expanded": ("ok", "AR(rows=torch.tensor([3]).expand(5))"),
"ar_C0": ("ok", "AR(rows=torch.zeros(0, dtype=torch.long))"),
"ar_N0": ("err", "AR(weight=w[:0], rows=torch.tensor([0]))"),
"ar_cb_width": ("err", "AR(c1=cb1[:, :3])"),
"ar_pq_width": ("err", "AR(c1=cb1[:, :2], c2=cb2[:, :2], residual=False)"),
"ar_pq_zero_width": ("err", "AR(c1=cb1[:, :0], c2=cb2, residual=False)"),
"ar_K0": ("err", "AR(c1=cb1[:0])"),
"ar_K_big": ("err", "AR(c1=torch.randn(8193, D))"),
"ar_cb_f64": ("err", "AR(c1=cb1.double())"),
"ar_cb_nan": ("?", "print(AR(c1=torch.full((K, D), float('nan'))))"),
"ar_cb_nan_pq": ("?", "print(AR(c1=torch.full((K, 2), float('nan')), c2=cb2[:, 2:], residual=False))"),
"ar_w_nan": ("ok", "print(AR(weight=mod(w, 3, float('nan'))))"),
"ar_w_noncontig": ("ok", "AR(weight=w.t().contiguous().t())"),
"ar_w_rowstride": ("ok", "AR(weight=torch.randn(N, 2*D)[:, :D])"),
"ar_w_expanded": ("ok", "AR(weight=w[:1].expand(N, D))"),
"ar_w_f16": ("ok", "AR(weight=w.half()); AR(weight=w.bfloat16(), rows=torch.tensor([1]))"),
"ar_w_int": ("err", "AR(weight=w.int())"),
"ar_d0": ("?", "AR(weight=torch.zeros(N, 0), c1=torch.zeros(K, 0), c2=torch.zeros(K, 0))"),
"ar_cb_noncontig": ("ok", "AR(c1=cb1.t().contiguous().t())"),
"ar_many_rows": ("ok", "AR(rows=torch.randint(0, N, (3000,)))"),
# ---- assign_codewords ----
"ac_valid": ("ok", "ops.assign_codewords(w, cb1)"),
"ac_K0": ("err", "ops.assign_codewords(w, cb1[:0])"),
"ac_N0": ("ok", "ops.assign_codewords(w[:0], cb1)"),
"ac_d0": ("ok", "ops.assign_codewords(w[:, :0], cb1[:, :0])"),
"ac_f16": ("err", "ops.assign_codewords(w.half(), cb1.half())"),
"ac_width": ("err", "ops.assign_codewords(w, cb1[:, :2])"),
"ac_nan": ("ok", "print(ops.assign_codewords(w, torch.full((K, D), float('nan'))))"),
"ac_expanded": ("ok", "ops.assign_codewords(w[:1].expand(3000, D), cb1)"),
"ac_1d": ("err", "ops.assign_codewords(w[0], cb1)"),
}
