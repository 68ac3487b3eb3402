"""Screen GPTQ variants end to end on SmolLM2's MLPs, in memory, before building one into the engine.

Sequential GPTQ as `qstream quantize --method gptq --preset mlp` runs it (each layer's Hessians from the already
quantized layers' outputs, act-order, imatrix exponents), but with the whole 135M model in float32 memory, so a
variant is a few lines here rather than a change to the engine. It reproduces the CLI (KL 0.13968 against 0.13984 at
1% dampening, paired z +0.08). Per-layer proxies did not predict the end-to-end KL (bench/NOTES.md), so variants
are judged here: KL(source || quantized) on the bench's 16 eval windows (the corpus's first 16 x 512 tokens) and on
16 validation windows (the next 16 x 512), calibration on its last 128 x 512 tokens, as bench_gptq.py.

    python bench/gptq_variants.py NAME DOWN_ASYM EXPONENTS DAMP THREADS   # writes /tmp/gptq-variant-NAME.json
      DOWN_ASYM  0: plain GPTQ; > 0: down_proj fitted, with this strength, to the source MLP's output while gate/up
                 are already quantized (W + s W (C - H) (H + damp)^-1, C = sum a_src a_q^T, H = sum a_q a_q^T);
                 < 0: down_proj's Hessian from the quantized gate/up's activations only
      EXPONENTS  imx: imatrix exponents under diag(H) / tokens; condvar: under 1 / diag((H + damp)^-1)
About 20 minutes on one loaded core.
"""

import json
import math
import sys
import time

import torch
from common import ROOT  # noqa: F401  (the repository on sys.path)
from transformers import AutoModelForCausalLM

from qstream import assets
from qstream.calib.calibrate import calibration_ids
from qstream.calib.gptq import dampened, prepare, solve
from qstream.calib.imatrix import quantize_weighted
from qstream.evals.scoring import score, windows
from qstream.format.mxfp4 import E8M0_BIAS, dequantize
from qstream.io.text_sources import wikipedia
from qstream.io.tokens import tokenize

SAMPLES, L, B, EVAL, VAL = 128, 512, 8, 16, 16


def main(name: str, lam: float, expo: str, damp: float) -> dict:
    src = assets.build_smollm2_dense(assets.cache_dir() / "smollm2-135m")
    wiki = wikipedia()
    cal = calibration_ids(src, wiki, SAMPLES, L)[0].reshape(SAMPLES, L)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    m, pos = model.model, torch.arange(L)[None]

    def channel_weights(h: torch.Tensor, n: int) -> torch.Tensor:
        if expo == "condvar":
            return 1.0 / torch.diagonal(torch.linalg.inv(dampened(h[None], damp)[0]))
        return torch.diagonal(h) / n

    def gptq(w: torch.Tensor, h: torch.Tensor, exps_from: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        e = quantize_weighted(exps_from, a.float().clamp(min=0)).scales.to(torch.int32) - E8M0_BIAS
        q = solve(w, prepare(h, damp=damp, act_order=True), e)
        return dequantize(q.packed, q.scales, torch.float32)

    def gram(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return ((a if b is None else b).T @ a).double()

    t0 = time.time()
    with torch.inference_mode():
        hidden = torch.cat([m.embed_tokens(cal[b:b + B]) for b in range(0, SAMPLES, B)])
        pe = m.rotary_emb(hidden[:B], pos)

        def layer_out(layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
            o = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
            return o[0] if isinstance(o, tuple) else o

        for i, layer in enumerate(m.layers):
            mlp, xs = layer.mlp, []

            def keep(mod: torch.nn.Module, a: tuple, xs: list = xs) -> None:
                xs.append(a[0].reshape(-1, a[0].shape[-1]).clone())

            hook = mlp.register_forward_pre_hook(keep)
            for b in range(0, SAMPLES, B):
                layer_out(layer, hidden[b:b + B])
            hook.remove()
            x = torch.cat(xs)
            n = x.shape[0]
            g, u, d = (p.weight.data.clone() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            hx = sum(gram(x[c:c + 8192]) for c in range(0, n, 8192))
            gq, uq = gptq(g, hx, g, channel_weights(hx, n)), gptq(u, hx, u, channel_weights(hx, n))
            ha = hq = cr = torch.zeros(d.shape[1], d.shape[1], dtype=torch.float64)
            for c in range(0, n, 8192):
                xc = x[c:c + 8192]
                a_src = mlp.act_fn(xc @ g.T) * (xc @ u.T)
                a_q = mlp.act_fn(xc @ gq.T) * (xc @ uq.T)
                ha, hq, cr = ha + gram(a_src), hq + gram(a_q), cr + gram(a_q, a_src)
            if lam > 0:  # exponents from the source weights, as verify --source holds them
                target = d.double() + lam * (d.double() @ (cr - hq) @ torch.linalg.inv(dampened(hq[None], damp)[0]))
                dq = gptq(target.float(), hq, d, channel_weights(hq, n))
            elif lam < 0:
                dq = gptq(d, hq, d, channel_weights(hq, n))
            else:
                dq = gptq(d, ha, d, channel_weights(ha, n))
            for p, q in ((mlp.gate_proj, gq), (mlp.up_proj, uq), (mlp.down_proj, dq)):
                p.weight.data.copy_(q)
            for b in range(0, SAMPLES, B):
                hidden[b:b + B] = layer_out(layer, hidden[b:b + B])
            print(f"layer {i} {time.time() - t0:.0f}s", flush=True)
        ids = tokenize(src, wiki)[0]
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        per, nll, kl, agree, tokens = [], 0.0, 0.0, 0, 0
        for k, w in enumerate(windows(ids.numel(), L, L, EVAL + VAL)):
            r = ref(input_ids=ids[None, w.begin:w.end], use_cache=False).logits[0, w.logit_rows()]
            q = model(input_ids=ids[None, w.begin:w.end], use_cache=False).logits[0, w.logit_rows()]
            s = score(q, ids[w.first_target:w.end], r)
            per.append(s.kl / s.tokens)
            if k < EVAL:
                nll, kl, agree, tokens = nll + s.nll, kl + s.kl, agree + s.agree, tokens + s.tokens
    return {"name": name, "down_asym": lam, "exponents": expo, "damp": damp,
            "kl": kl / tokens, "ppl": math.exp(nll / tokens), "top1": agree / tokens,
            "per_window_kl": per[:EVAL], "val_kl": sum(per[EVAL:]) / VAL, "val_window_kl": per[EVAL:],
            "seconds": time.time() - t0}


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[5]))
    out = main(sys.argv[1], float(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
    with open(f"/tmp/gptq-variant-{out['name']}.json", "w") as fh:
        json.dump(out, fh)
    print(json.dumps({k: v for k, v in out.items() if not k.endswith("window_kl")}))
