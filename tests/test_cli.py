"""The command line as a person meets it: what --help costs, choices, a dense model's plan, Ctrl-C, verify's words.

Commands run as real subprocesses where the process itself is under test (what it imports, how it takes a
signal); in-process through click's runner otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from qstream.cli import ONEDNN_CACHES, cli
from qstream.common import REPORT_NAME, human_bytes
from qstream.io.checkpoint import open_checkpoint
from qstream.io.staging import temp_dir_for
from tests.test_evaluate import PROSE, byte_tokenizer

HEAVY = {"torch", "numpy", "safetensors", "transformers", "ray"}
SHARDS = ["--max-shard-size", "48KiB", "--no-progress"]  # tiny_qwen3_moe in 9 shards


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------- install

ROOT = Path(__file__).resolve().parent.parent


def test_readme_install_section_matches_the_project() -> None:
    """The Install section names the entry point, the torch pin scripts/env installs, and extras that exist."""
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):readme.index("## Use")]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["qstream"] == "qstream.cli:main" and ".venv/bin/qstream" in install
    pin = re.search(r'"torch==([0-9.]+)"', (ROOT / "scripts" / "env").read_text())[1]
    assert f"torch=={pin}" in install and f"tested with {pin}" in install
    floor = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert f"`{floor}`" in install
    named = set(re.findall(r"\[(\w+)\]", install))
    assert named and named <= set(project["optional-dependencies"]), named


# ---------------------------------------------------------------------------------------------- imports


@pytest.mark.parametrize("args", [
    ["--help"], ["--version"], ["quantize", "--help"], ["plan", "--help"], ["compare-rules", "--help"],
    ["quantise", "./M", "./M-MXFP4"],  # a typo'd command
    ["quantize", "./M"],  # a missing argument
    ["quantize", "./M", "./M-MXFP4", "--rule", "nope"],  # a bad choice
], ids=" ".join)
def test_help_and_usage_errors_do_not_import_torch(args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "qstream", *args], capture_output=True, text=True,
                         check=False)
    assert res.returncode in (0, 2), res.stderr
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in res.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "qstream" in imported and "click" in imported  # the probe sees imports at all
    assert not imported & HEAVY, f"{args}: imported {sorted(imported & HEAVY)}"


@pytest.mark.parametrize("own", [None, "7"], ids=["default", "the user's"])
def test_onednn_caches_are_bounded_before_torch_loads(tiny_llama: Path, tmp_path: Path, own: str | None) -> None:
    """main() sets oneDNN's cache sizes before torch is imported (read when oneDNN first runs), unless the user
    set them."""
    probe = textwrap.dedent(f"""
        import os, sys
        class AtTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    print("at torch:", {{k: os.environ.get(k) for k in {list(ONEDNN_CACHES)}}}, flush=True)
                    sys.meta_path.remove(self)
                return None
        sys.meta_path.insert(0, AtTorch())
        from qstream.cli import main
        sys.argv = ["qstream", *sys.argv[1:]]
        main()
    """)
    env = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHES}
    env.update({k: own for k in ONEDNN_CACHES} if own else {})
    out = subprocess.run([sys.executable, "-c", probe, "plan", str(tiny_llama),
                          "--preset", "mlp"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert f"at torch: { {k: own or v for k, v in ONEDNN_CACHES.items()} }" in out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux") or "CS_GNU_LIBC_VERSION" not in os.confstr_names,
                    reason="glibc's malloc arenas")
@pytest.mark.parametrize("own", [None, "4"], ids=["default", "the user's"])
def test_one_malloc_arena(tiny_llama: Path, own: str | None) -> None:
    """After main(), threads that allocate at once share one glibc arena (malloc_info lists each arena as a
    heap), unless the user set MALLOC_ARENA_MAX."""
    probe = textwrap.dedent("""
        import ctypes, sys, tempfile, threading
        from qstream.cli import main
        sys.argv = ["qstream", *sys.argv[1:]]
        try:
            main()
        except SystemExit:
            pass
        start = threading.Barrier(6)
        def allocate():
            start.wait()
            keep = [bytearray(200_000) for _ in range(20)]
            start.wait()
        threads = [threading.Thread(target=allocate) for _ in range(5)]
        for t in threads:
            t.start()
        start.wait()
        libc = ctypes.CDLL(None)
        libc.fopen.restype = ctypes.c_void_p
        with tempfile.NamedTemporaryFile(suffix=".xml") as f:
            fp = libc.fopen(f.name.encode(), b"w")
            libc.malloc_info(0, ctypes.c_void_p(fp))
            libc.fclose(ctypes.c_void_p(fp))
            print("arenas:", open(f.name).read().count("<heap nr="))
        start.wait()
    """)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | ({"MALLOC_ARENA_MAX": own} if own else {})
    out = subprocess.run([sys.executable, "-c", probe, "plan", str(tiny_llama), "--preset", "mlp"], capture_output=True,
                         text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    arenas = int(out.stdout.rsplit("arenas:", 1)[1])
    assert arenas == 1 if own is None else arenas > 1, out.stdout


# ---------------------------------------------------------------------------------------------- choices


def test_choices_in_any_case(tiny_llama: Path, tmp_path: Path) -> None:
    res = run("quantize", tiny_llama, tmp_path / "q", "--preset", "MLP", "--rule", "MSE3", "--keep-dtype", "Source",
              "--device", "CPU", "--no-progress")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "q" / REPORT_NAME).read_text())
    assert (report["rule"], report["preset"], report["device"]) == ("mse3", "mlp", "cpu")


def test_compare_rules_preset_is_a_choice_and_no_progress_works(tiny_llama: Path, tmp_path: Path) -> None:
    res = run("compare-rules", tiny_llama, "--preset", "dense")
    assert res.exit_code == 2 and "'dense' is not one of 'experts', 'mlp', 'all-linear'" in res.output
    src = Path(shutil.copytree(tiny_llama, tmp_path / "src"))
    byte_tokenizer(src)
    text = tmp_path / "prose.txt"
    text.write_text(PROSE)
    res = run("compare-rules", src, "--preset", "Mlp", "--rules", "FLOOR,mse3", "--workdir", tmp_path / "work",
              "--text-file", text, "--seq-len", "64", "--max-windows", "1", "--device", "cpu", "--no-progress")
    assert res.exit_code == 0, res.output
    assert re.search(r"^\| floor ", res.output, re.MULTILINE) and re.search(r"^\| mse3", res.output, re.MULTILINE)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["src-mxfp4-floor", "src-mxfp4-mse3"]


# ------------------------------------------------------------------------------------ a dense model's plan


def test_plan_of_a_dense_model_names_the_preset_that_fits(tiny_llama: Path, tmp_path: Path) -> None:
    hint = "nothing to quantize: no routed experts found (preset experts); use --preset mlp or --preset all-linear"
    res = run("plan", tiny_llama)
    assert res.exit_code == 0 and res.stderr == "", res.stderr
    assert "| language | dense_mlp | BF16" in res.output and "MXFP4" not in res.output.split("total:")[0]
    assert "0 source tensors -> 0 MXFP4 modules\n" in res.output and hint in res.output
    assert "qstream plan" not in res.output
    res = run("plan", tiny_llama, "--json")
    assert res.exit_code == 0 and not any(t["quantize"] for t in json.loads(res.stdout)["tensors"])
    assert res.stderr == f"qstream: {hint}\n"
    res = run("quantize", tiny_llama, tmp_path / "q")
    assert res.exit_code == 2 and res.stderr == f"qstream: error: {tiny_llama}: {hint}\n"
    assert not (tmp_path / "q").exists()
    res = run("plan", tiny_llama, "--preset", "mlp", "--exclude", "*.mlp.*")
    assert res.exit_code == 0 and "--exclude or --skip-indivisible keep every tensor preset mlp selects" in res.output


def test_ray_address_is_checked_first(tiny_llama: Path, tmp_path: Path) -> None:
    """A path given to --ray (SRC swallowed) is refused in one line, before Ray or the plan is touched."""
    res = run("quantize", tiny_llama, tmp_path / "q", "--preset", "mlp", "--ray", tmp_path / "elsewhere")
    assert res.exit_code == 2 and res.stderr.startswith("qstream: error: --ray ") and "not a Ray address" in res.stderr
    assert res.stderr.count("\n") == 1 and not (tmp_path / "q").exists()


# ---------------------------------------------------------------------------------------------- Ctrl-C

# Runs the real CLI with one hook installed first; the hook stands still at a known point (after
# telling the test, through a file it can see) until the test's SIGINT arrives, so nothing is timed.
# It waits in short sleeps, not signal.pause(): the kernel may hand the signal to a worker thread,
# and Python raises KeyboardInterrupt in the main thread the next time it runs bytecode.
AFTER_FIRST_SHARD = """
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):  # a shard is written as NAME.partial and renamed once complete
        real_replace(src, dst, *args, **kwargs)
        if str(src).endswith(".safetensors.partial"):
            while True:
                time.sleep(0.01)
    os.replace = replace
"""
AT_TORCH_IMPORT = """
    class StopAtTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                Path(os.environ["READY"]).touch()
                while True:
                    time.sleep(0.01)
            return None
    sys.meta_path.insert(0, StopAtTorch())
"""


def interrupted(hook: str, ready: Callable[[], bool], *args: object, env: dict | None = None) -> tuple[int, str]:
    """Start `qstream ARGS` with `hook`, wait until `ready()`, send SIGINT; (exit code, stderr)."""
    child = "import os, sys, time\nfrom pathlib import Path\n" + textwrap.dedent(hook) + textwrap.dedent("""
        from qstream.cli import main
        sys.argv = ["qstream"] + sys.argv[1:]
        main()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {}), "QSTREAM_DEBUG": ""})
    deadline = time.monotonic() + 600  # a safety net against a hang, not part of the check
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never reached the point to interrupt: {proc.communicate()}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"SIGINT did not stop it: {proc.communicate()}")
    return proc.returncode, err


def test_ctrl_c_mid_run_keeps_the_output_for_resume(tiny_qwen3_moe: Path, tmp_path: Path) -> None:
    dst = tmp_path / "q"
    tmp = temp_dir_for(dst)
    code, err = interrupted(AFTER_FIRST_SHARD, lambda: any(tmp.glob("model-*.safetensors")),
                            "quantize", tiny_qwen3_moe, dst, *SHARDS)
    size = human_bytes(sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()))
    assert code == 130
    assert err == f"qstream: interrupted; the unfinished output is kept in {tmp} ({size}): run the same command " \
                  "with --resume to finish it\n"
    assert not dst.exists() and not list(tmp.glob("*.partial"))
    res = run("quantize", tiny_qwen3_moe, dst, *SHARDS, "--resume")
    assert res.exit_code == 0, res.output
    assert not tmp.exists() and open_checkpoint(dst)


def test_ctrl_c_while_torch_loads(tiny_qwen3_moe: Path, tmp_path: Path) -> None:
    ready, dst = tmp_path / "ready", tmp_path / "q"
    code, err = interrupted(AT_TORCH_IMPORT, ready.exists, "quantize", tiny_qwen3_moe, dst, env={"READY": str(ready)})
    assert code == 130
    assert err == "qstream: interrupted; no unfinished output was kept, so there is nothing to --resume\n"
    assert not dst.exists() and not temp_dir_for(dst).exists()


# ---------------------------------------------------------------------------------------------- verify


def test_verify_words_and_exit_codes(tiny_llama: Path, tmp_path: Path) -> None:
    res = run("verify", tmp_path / "nope")
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr == f"qstream: error: {tmp_path / 'nope'}: does not exist; give a local checkpoint directory\n"
    (tmp_path / "empty").mkdir()
    res = run("verify", tmp_path / "empty")
    assert res.exit_code == 1
    assert "FAIL layout: config.json, index and shard headers\n" in res.stdout and "config.json: missing" in res.stdout
    assert run("quantize", tiny_llama, tmp_path / "q", "--preset", "mlp", "--no-progress").exit_code == 0
    res = run("verify", tmp_path / "q", "--source", tiny_llama)
    assert res.exit_code == 0, res.stdout
    assert "FORMAT.md" not in res.stdout and "expert" not in res.stdout  # a dense model has none
