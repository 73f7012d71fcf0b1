"""The MIDX index of a bf16/fp16 weight is built without a float32 copy of the weight (a 100M x 64
bf16 head would need 25.6 GB for it): k-means on a widened subsample, the assignment widened one
chunk of rows at a time. It must give the codes the whole-matrix float32 path gives for the same
codebooks, and an exact proposal."""
import pytest
import torch

from imi_softmax import IMISoftmax, MIDXSampler, ops
from imi_softmax.kmeans import assign_residual
from imi_softmax.optim import RowWiseAdagrad
from conftest import reference_midx_log_q


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quantizer", ["rq", "pq"])
def test_half_weight_index_codes_and_exact_log_q(dtype, quantizer):
    g = torch.Generator().manual_seed(0)
    n, d, k = 70_000, 12, 8  # more rows than one assignment chunk (65,536) and than the k-means cap
    w = (torch.randn(n, d, generator=g) * 3).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    s = MIDXSampler(num_codewords=k, quantizer=quantizer, kmeans_iters=3).build(w, b)
    c1, c2 = s.codebooks
    assert c1.dtype == torch.float32 and c2.dtype == torch.float32
    wf = w.float()
    if quantizer == "rq":
        ref1 = ops.assign_codewords(wf, c1)[0]
        ref2 = assign_residual(wf, c1, ref1, c2)
    else:
        h = d // 2
        ref1 = ops.assign_codewords(wf[:, :h].contiguous(), c1)[0]
        ref2 = ops.assign_codewords(wf[:, h:].contiguous(), c2)[0]
    assert torch.equal(s.code1, ref1) and torch.equal(s.code2, ref2)
    torch.testing.assert_close(s.beta, b.float(), atol=0, rtol=0)
    q = torch.randn(5, d, generator=g)
    lp = s.log_prob(q, torch.arange(n).expand(5, n).contiguous())
    assert torch.logsumexp(lp.double(), 1).abs().max() < 1e-5
    ref = reference_midx_log_q(s, q)
    assert ((lp.double() - ref).abs() < 1e-4 * (1 + ref.abs())).all()


def test_half_weight_out_of_float32_square_range_is_named():
    w = torch.ones(100, 8, dtype=torch.bfloat16)
    w[3, 2] = 1e25  # finite in bf16, its square is not in float32
    with pytest.raises(ValueError, match="squared row norms"):
        MIDXSampler(num_codewords=4).build(w)


def test_bf16_head_trains_with_rowwise_adagrad():
    torch.manual_seed(0)
    head = IMISoftmax(16, 5000, num_samples=32, num_codewords=8, sparse_grad=True, dtype=torch.bfloat16)
    opt = RowWiseAdagrad(head.parameters(), lr=0.1)
    x = torch.randn(64, 16, dtype=torch.bfloat16)
    y = torch.randint(0, 5000, (64,))
    losses = []
    for _ in range(20):
        loss = head(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    head.refresh_index(full=True)
    assert head.sampler.codebooks[0].dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0]
