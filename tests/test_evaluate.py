"""qstream eval: perplexity, KL and top-1 agreement against independent computations with plain transformers."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qstream.cli import cli
from qstream.common import EVAL_SCHEMA, read_saved
from qstream.errors import QstreamError
from qstream.evals.evaluate import Protocol, evaluate, save_into
from qstream.evals.models import load_model
from qstream.evals.scoring import Window, windows
from qstream.io import tokens as tokens_module
from qstream.io.text_sources import HF_JOIN, Text, from_file, from_hf_cache
from qstream.io.tokens import PREFIX_MARGIN_CHARS, load_tokenizer, settled_ids, tokenize
from tests.fixtures import assert_same_files
from tests.test_dequantize import quantize

# Real English prose (about 1.9k bytes = tokens under the byte-level tokenizer below).
PROSE = (
    "The river rises in the hills north of the town and flows south through a broad valley of farms and "
    "orchards before it reaches the sea. In the nineteenth century the valley was known for its mills, which "
    "used the steady current to grind wheat and saw timber; a few of the old stone buildings still stand beside "
    "the water, and one has been turned into a small museum. The railway arrived in 1872, and with it came "
    "visitors from the city who walked the riverside paths on summer weekends.\n\n"
    "Today the town has about twelve thousand inhabitants. Its market is held every Saturday in the square in "
    "front of the church, where farmers sell vegetables, cheese, honey and bread. The school, the library and "
    "the swimming pool were all built in the 1960s, when the population grew quickly after a factory opened on "
    "the eastern edge of town. The factory closed in 1994, and many of the younger families moved away to find "
    "work, but in recent years new houses have been built and the number of residents has begun to rise again.\n\n"
    "The climate is mild, with cool wet winters and warm dry summers. Snow is rare, although the hills are "
    "sometimes white for a few days in January. Spring comes early, and by the end of March the orchards are in "
    "flower. The river floods about once every ten years; the worst flood on record, in 1953, reached the steps "
    "of the town hall, and a line painted on its wall shows how high the water rose."
)
CPU32 = dict(dtype="float32", device="cpu")


def byte_tokenizer(out: Path) -> None:
    """A real byte-level BPE tokenizer with no merges: 256 tokens, one per byte, like the fixtures' vocab."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)


@pytest.fixture(scope="module")
def lm(tiny_llama: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(source, MXFP4 checkpoint of its MLPs): the tiny Llama with a byte tokenizer, quantized by qstream."""
    root = tmp_path_factory.mktemp("eval")
    src = root / "src"
    shutil.copytree(tiny_llama, src)
    byte_tokenizer(src)
    return src, quantize(src, root / "q", "mlp")


def text_of(s: str) -> Text:
    return Text(s, {"kind": "file", "path": "<test>"})


def reference_windows(model, ids: torch.Tensor, seq_len: int, stride: int, max_windows: int | None = None):
    """The Hugging Face perplexity guide's loop, with plain transformers: (per-window logits rows, nll sum, count)."""
    nll, count, rows = 0.0, 0, []
    prev_end = 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + seq_len, ids.numel())
        trg_len = end - prev_end
        input_ids = ids[None, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            out = model(input_ids, labels=labels)
        n = int((labels[:, 1:] != -100).sum())
        nll += out.loss.item() * n
        count += n
        rows.append(out.logits[0, -n - 1:-1])
        prev_end = end
        if end == ids.numel() or len(rows) == max_windows:
            break
    return rows, nll, count


@pytest.fixture(scope="module")
def plain(lm):
    """The source with plain transformers and the MXFP4 checkpoint decoded by compressed-tensors (independent)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    src, q = lm
    tok = AutoTokenizer.from_pretrained(src)
    ids = torch.tensor(tok(PROSE, add_special_tokens=False)["input_ids"])
    a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    return ids, a, b, tok


def test_windows_by_hand() -> None:
    assert windows(10, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    assert windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    assert windows(10, 4, 2, max_windows=2) == [Window(0, 4, 1), Window(2, 6, 4)]
    assert windows(3, 8, 8) == [Window(0, 3, 1)]
    for n, L, s in [(100, 16, 5), (17, 16, 1), (40, 40, 7), (101, 16, 16)]:
        scored = [t for w in windows(n, L, s) for t in range(w.first_target, w.end)]
        # strided: every token after the first exactly once; non-overlapping: all but each window's first
        assert scored == [t for t in range(1, n) if s < L or t % L]
        assert all(w.end - w.begin <= L and w.first_target > w.begin for w in windows(n, L, s))
    with pytest.raises(ValueError):
        windows(1, 4, 4)
    with pytest.raises(ValueError):
        windows(10, 4, 5)


@pytest.mark.parametrize("seq_len,stride", [(256, 256), (256, 96)])
def test_matches_plain_transformers(lm, plain, seq_len: int, stride: int) -> None:
    """Same windows, computed independently: PPL of both models, KL(source || MXFP4) and top-1 agreement.

    stride < seq_len checks the overlap masking against the HF guide's labels=-100 loop."""
    src, q = lm
    ids, a, b, _ = plain
    result = evaluate(src, [q], text_of(PROSE), Protocol(seq_len=seq_len, stride=stride, max_windows=3, **CPU32),
                      progress=False)
    rows_a, nll_a, count = reference_windows(a, ids, seq_len, stride, 3)
    rows_b, nll_b, _ = reference_windows(b, ids, seq_len, stride, 3)
    la, lb = torch.cat(rows_a).log_softmax(-1), torch.cat(rows_b).log_softmax(-1)
    kl = torch.nn.functional.kl_div(lb, la, log_target=True, reduction="sum").item() / count
    agree = (la.argmax(-1) == lb.argmax(-1)).float().mean().item()

    s, m = result.models
    assert result.protocol["tokens_scored"] == s.tokens == m.tokens == count
    assert result.protocol["windows"] == 3 and result.protocol["stride"] == stride
    assert s.mean_nll == pytest.approx(nll_a / count, rel=1e-5)
    assert m.mean_nll == pytest.approx(nll_b / count, rel=1e-5)
    assert s.ppl == pytest.approx(math.exp(s.mean_nll)) and m.ppl == pytest.approx(math.exp(m.mean_nll))
    assert m.kl == pytest.approx(kl, rel=1e-4) and m.kl > 0
    assert m.top1_agree == pytest.approx(agree)
    assert s.kl is None and s.top1_agree is None


def test_strided_scores_every_token_once(lm, plain) -> None:
    """seq_len 24, stride 8: each token is scored once, from the first window that reaches it."""
    src, _ = lm
    ids, a, _, _ = plain
    text, L, S = PROSE[:100], 24, 8
    result = evaluate(src, [], text_of(text), Protocol(seq_len=L, stride=S, **CPU32), progress=False)
    n = len(text.encode())
    with torch.no_grad():  # by hand: window k starts at k*S and, for k >= 1, scores tokens [k*S + L - S, k*S + L)
        nll = 0.0
        for t in range(1, n):
            begin = (t - (L - S)) // S * S if t >= L else 0
            logits = a(ids[None, begin:t]).logits[0, -1]
            nll -= logits.log_softmax(-1)[ids[t]].item()
    assert result.source.tokens == n - 1
    assert result.source.mean_nll == pytest.approx(nll / (n - 1), rel=1e-5)


def test_kl_of_a_model_with_itself(lm) -> None:
    src, _ = lm
    result = evaluate(src, [src], text_of(PROSE), Protocol(seq_len=128, max_windows=3, **CPU32), progress=False)
    s, m = result.models
    assert m.kl == 0.0 and m.top1_agree == 1.0 and m.mean_nll == s.mean_nll


def test_text_shorter_than_one_window(lm, plain) -> None:
    src, _ = lm
    _, a, _, tok = plain
    text = "A short sentence."
    result = evaluate(src, [], text_of(text), Protocol(seq_len=256, **CPU32), progress=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = a(ids, labels=ids).loss.item()
    assert result.protocol["short_text"] and result.protocol["windows"] == 1
    assert result.source.tokens == len(text) - 1
    assert result.source.mean_nll == pytest.approx(loss, rel=1e-5)
    assert "shorter than one window" in result.protocol_text()


def test_empty_and_one_token_texts(lm, tmp_path: Path) -> None:
    src, _ = lm
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(QstreamError, match="empty") as err:
        from_file(empty)
    assert str(empty) in str(err.value)
    with pytest.raises(QstreamError, match="at least 2"):
        evaluate(src, [], text_of("A"), Protocol(**CPU32), progress=False)
    res = CliRunner().invoke(cli, ["eval", str(src), "--text-file", str(empty)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and str(empty) in res.output


def test_mxfp4_loads_with_our_decoding(lm, plain, tiny_qwen35: Path, tmp_path: Path) -> None:
    """The MXFP4 checkpoint's model holds qstream's decoded weights, equal to compressed-tensors' decoding,
    also for fused experts and a multimodal checkpoint (text model, as AutoModelForCausalLM builds it)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    _, q = lm
    _, _, b, _ = plain
    cpu = torch.device("cpu")
    ours = load_model(q, torch.float32, cpu).state_dict()
    assert ours.keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in ours.items())

    q35 = quantize(tiny_qwen35, tmp_path / "q35")
    ours = load_model(q35, torch.bfloat16, cpu)
    theirs = AutoModelForCausalLM.from_pretrained(q35, dtype=torch.bfloat16,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    assert type(ours) is type(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def trained_bpe(out: Path, text: str) -> None:
    """A real GPT-2-style tokenizer (byte-level, regex pre-tokenizer, BPE merges learnt on `text`)."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600, initial_alphabet=ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)


def assert_prefix_ids_equal_whole(tok_dir: Path, text: str, cuts: list[int], counts: list[int]) -> None:
    """The ids settled in text[:cut] are the first ids of the whole text, for every cut (mid-word, in whitespace
    runs or digits: the cut's own token differs there); tokenize(..., n) returns the whole text's first n ids."""
    tok = load_tokenizer(tok_dir)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    for cut in cuts:
        ids = settled_ids(tok, text, cut)
        assert ids == whole[:len(ids)], cut
        assert len(ids) > (cut - PREFIX_MARGIN_CHARS) // 8, cut  # all but the margin's tokens settle
    from_prefix = 0
    for n in counts:
        ids, all_text = tokenize(tok_dir, text_of(text), n)
        assert ids.tolist() == (whole if all_text else whole[:n]), n
        from_prefix += not all_text
    assert from_prefix >= len(counts) // 2  # most counts were served from a prefix, not the whole text


@pytest.mark.parametrize("guess", [1, tokens_module.CHARS_PER_TOKEN_GUESS])
def test_prefix_tokenization_equals_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guess: int) -> None:
    """A GPT-2-style BPE on real prose; guess 1 makes tokenize grow its prefix several times."""
    monkeypatch.setattr(tokens_module, "CHARS_PER_TOKEN_GUESS", guess)
    text = "\n\n".join(f" = Part {i} = \n\n{PROSE[i * 97:]}  {1872 + i}\n\n\n{PROSE[:i * 211]}" for i in range(6))
    trained_bpe(tmp_path, PROSE)
    cuts = list(range(PREFIX_MARGIN_CHARS + 1, len(text), 7))
    assert_prefix_ids_equal_whole(tmp_path, text, cuts, [1, 2, 50, 333, 1000, 1234, 1500, 2222, 2500, 10**6])


@pytest.mark.slow
def test_smollm2_prefix_tokenization_equals_whole(tmp_path: Path) -> None:
    """The real SmolLM2 tokenizer on the real corpus, against 200k characters tokenized at once."""
    from transformers import AutoTokenizer

    from qstream.assets import SMOLLM2, wiki_text

    gguf = SMOLLM2.path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp_path)
    text = wiki_text(max_chars=200_000)
    breaks = [m.start() + d for m in re.finditer("\n\n", text[:60_000]) for d in (0, 1, 2)]
    cuts = [c for c in breaks + list(range(0, len(text), 997)) if c > PREFIX_MARGIN_CHARS]
    assert_prefix_ids_equal_whole(tmp_path, text, cuts, [1, 1023, 2048, 4097, 8192, 16384, 20000, 30001, 50000])


def test_progress_lines_when_not_a_terminal(lm, capsys: pytest.CaptureFixture[str]) -> None:
    """With stderr not a terminal (a log), eval prints what it will score, then a line per model as it is scored
    (tokens/s), no bar."""
    src, q = lm
    evaluate(src, [q], text_of(PROSE), Protocol(seq_len=128, max_windows=3, **CPU32), labels=["bf16", "MXFP4"])
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "eval: 2 model(s) to score on 3 window(s) of 128 tokens, one decoder layer at a time"
    for line, label in zip(err[1:], ["bf16", "MXFP4"], strict=True):
        assert re.fullmatch(rf"scored {label}: 381 tokens in \d+\.\d s \(\d+ tokens/s\), PPL \d+\.\d{{4}}", line), line
    assert not any("\r" in line or "it/s" in line for line in err)


def _arrow(path: Path, rows: list[str]) -> None:
    """An Arrow stream file as `datasets` writes its cache (schema metadata included)."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    features = {"info": {"features": {"text": {"dtype": "string", "_type": "Value"}}}}
    schema = pa.schema([pa.field("text", pa.string())], metadata={"huggingface": json.dumps(features)})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for i in range(0, len(rows), 3):  # several record batches, as datasets writes them
            writer.write_batch(pa.record_batch([pa.array(rows[i:i + 3])], schema=schema))


WIKI_ROWS = ["", " = Valley = \n", "", " The river rises in the hills . \n", " It floods about once a decade . \n",
             "", " = = Climate = = \n", "", " The climate is mild . \n"]


def test_hf_cache_text_source(tmp_path: Path) -> None:
    cache = tmp_path / "datasets"
    _arrow(cache / "Salesforce___wikitext/wikitext-2-raw-v1/0.0.0/b08601e04326c79d/wikitext-test.arrow", WIKI_ROWS)
    _arrow(cache / "Salesforce___wikitext/wikitext-2-raw-v1/0.0.0/b08601e04326c79d/wikitext-train.arrow", ["x"])
    _arrow(cache / "Salesforce___wikitext/wikitext-103-raw-v1/0.0.0/aaaa/wikitext-test.arrow", ["other"])
    text = from_hf_cache(cache)
    assert text.text == HF_JOIN.join(WIKI_ROWS)
    assert text.describe()["rows"] == len(WIKI_ROWS) and text.source["config"] == "wikitext-2-raw-v1"
    # Any directory inside the cache works too, e.g. the hash directory.
    assert from_hf_cache(cache / "Salesforce___wikitext/wikitext-2-raw-v1/0.0.0/b08601e04326c79d").text == text.text

    sharded = tmp_path / "sharded"
    base = sharded / "wikitext/wikitext-2-raw-v1/1.0.0/abc"
    _arrow(base / "wikitext-test-00001-of-00002.arrow", WIKI_ROWS[5:])
    _arrow(base / "wikitext-test-00000-of-00002.arrow", WIKI_ROWS[:5])
    assert from_hf_cache(sharded).text == text.text

    _arrow(cache / "Salesforce___wikitext/wikitext-2-raw-v1/0.0.0/other/wikitext-test.arrow", WIKI_ROWS)
    with pytest.raises(QstreamError, match="several caches"):
        from_hf_cache(cache)
    with pytest.raises(QstreamError, match="no Hugging Face datasets cache of wikitext/wikitext-2-raw-v1"):
        from_hf_cache(tmp_path / "sharded", split="validation")
    _arrow(tmp_path / "empty/wikitext/wikitext-2-raw-v1/1.0.0/abc/wikitext-test.arrow", [""])
    with pytest.raises(QstreamError, match="empty"):
        from_hf_cache(tmp_path / "empty")


def test_cli_table_json_and_save_into(lm, tmp_path: Path) -> None:
    src, q = lm
    q = shutil.copytree(q, tmp_path / "q")
    text = tmp_path / "wiki.test.raw"
    text.write_text(PROSE)
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(cli, ["eval", str(src), str(q), "--text-file", str(text), "--seq-len", "128",
                                   "--stride", "64", "--max-windows", "4", "--device", "cpu", "--json", str(out),
                                   "--save-into", str(q)])
    assert res.exit_code == 0, res.output
    assert "| Model | Mean NLL | Perplexity | ΔPPL" in res.output
    assert "seq_len 128, stride 64, 4 window(s)" in res.output
    data = json.loads(out.read_text())
    assert data["schema"] == EVAL_SCHEMA and [m["label"] for m in data["models"]] == ["src", "q"]
    assert data["protocol"]["text"]["kind"] == "file" and data["protocol"]["tokens_scored"] == 127 + 3 * 64
    saved = read_saved(q)
    assert saved["model"] == data["models"][1] and saved["source"] == data["models"][0]
    assert saved["protocol"] == data["protocol"]

    res = CliRunner().invoke(cli, ["eval", str(src), "--text-file", str(text), "--save-into", str(q)])
    assert res.exit_code == 2 and "not among the QUANTIZED" in res.output
    res = CliRunner().invoke(cli, ["eval", str(src), "--text-file", str(text), "--hf-cache", str(tmp_path)])
    assert res.exit_code == 2 and "pass one of them" in res.output
    assert read_saved(tmp_path) is None
    with pytest.raises(QstreamError, match="not among"):
        save_into(evaluate(src, [], text_of(PROSE), Protocol(seq_len=64, max_windows=1, **CPU32), progress=False), q)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Real SmolLM2-135M (dense), its MXFP4 MLPs (mlp preset), and its exact 4-expert MoE with MXFP4 experts."""
    from qstream.assets import build_smollm2_dense, build_smollm2_moe

    root = tmp_path_factory.mktemp("smollm2")
    dense = build_smollm2_dense(root / "dense")
    moe = build_smollm2_moe(dense, root / "moe4")
    return dense, quantize(dense, root / "dense-mxfp4", "mlp"), quantize(moe, root / "moe4-mxfp4")


SMOL_PROTOCOL = Protocol(seq_len=1024, max_windows=4, **CPU32)


@pytest.mark.slow
def test_smollm2_mxfp4_perplexity_and_kl(smollm2) -> None:
    from qstream.io.text_sources import wikipedia

    dense, q, _ = smollm2
    result = evaluate(dense, [q], wikipedia(max_chars=40_000), SMOL_PROTOCOL, labels=["BF16", "MXFP4 mlp"])
    print("\n" + result.protocol_text() + "\n" + result.table())
    for m in result.models:
        print(f"{m.label}: {result.protocol['tokens_scored'] / m.seconds:.0f} tokens/s (forward + scoring, CPU)")
    s, m = result.models
    assert 8 < s.ppl < 25  # ASSETS.md: about 12-15 on this text with 1024-token windows
    assert s.ppl < m.ppl < 2 * s.ppl and 0 < m.kl < 1 and 0.5 < m.top1_agree < 1


@pytest.mark.slow
def test_smollm2_moe_oracle(smollm2) -> None:
    """ASSETS.md's exact oracle: the quantized upcycled MoE computes what the quantized dense model does."""
    from qstream.io.text_sources import wikipedia

    _, q, moe_q = smollm2
    result = evaluate(q, [moe_q], wikipedia(max_chars=40_000), SMOL_PROTOCOL, labels=["dense MXFP4", "MoE MXFP4"])
    print("\n" + result.protocol_text() + "\n" + result.table())
    d, m = result.models
    assert m.ppl == pytest.approx(d.ppl, rel=1e-5)
    assert m.kl < 1e-6 and m.top1_agree > 0.999


@pytest.mark.slow
def test_smollm2_requantize(smollm2, tmp_path: Path) -> None:
    """On real weights: dequantize -> quantize loses nothing (relative error 0) and is a byte fixed point after
    one round; print how many mse3 blocks the first round moves (largest code 3 -> the exponent below)."""
    from qstream.convert.dequantize import dequantize_checkpoint

    _, q1, _ = smollm2
    dequantize_checkpoint(q1, tmp_path / "d1", progress=False)
    q2 = quantize(tmp_path / "d1", tmp_path / "q2", "mlp")
    assert json.loads((q2 / "qstream_report.json").read_text())["totals"]["rel_error"] == 0.0
    from safetensors.torch import load_file

    a, b = load_file(next(q1.glob("*.safetensors"))), load_file(next(q2.glob("*.safetensors")))
    scales = [k for k in a if k.endswith("weight_scale")]
    moved = sum(int((a[k] != b[k]).sum()) for k in scales)
    print(f"\nmse3 blocks whose scale byte changes on requantization: {moved} of {sum(a[k].numel() for k in scales)}")
    dequantize_checkpoint(q2, tmp_path / "d2", progress=False)
    q3 = quantize(tmp_path / "d2", tmp_path / "q3", "mlp")
    assert_same_files(q3, q2, "*.safetensors")
