"""The kvcache-infer command line: each subcommand, its --help, and short errors."""
from __future__ import annotations

import json

import pytest

from kvcache_infer.cli import build_parser, main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_subcommand_has_help_for_every_option(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    assert set(sub.choices) == {"generate", "serve", "bench", "profile", "info"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0 and "--model" in capsys.readouterr().out


def test_generate_ids_streams_and_reports_latency(exported, capsys):
    code, out, err = run(["generate", "--model", str(exported["tiny-a"]), "--ids", "1,2,3",
                          "--max-new-tokens", "12", "--threads", "1", "--temperature", "0"], capsys)
    assert code == 0 and len(out.split()) == 12
    assert "12 new tokens" in err and "first token" in err and "cached token p50" in err
    from kvcache_infer import KVCacheInferencer
    assert [int(x) for x in out.split()] == KVCacheInferencer(exported["tiny-a"]).generate([1, 2, 3], 12)


def test_generate_speculative_lookup_prints_the_plain_greedy_tokens(exported, capsys):
    ids = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    code, out, err = run(["generate", "--model", str(exported["tiny-a"]), "--ids", ",".join(map(str, ids)),
                          "--max-new-tokens", "30", "--temperature", "0", "--speculative", "lookup"], capsys)
    from kvcache_infer import KVCacheInferencer
    assert code == 0 and [int(x) for x in out.split()] == KVCacheInferencer(exported["tiny-a"]).generate(ids, 30)
    code, out, err = run(["generate", "--model", str(exported["tiny-a"]), "--ids", "1", "--speculative",
                          "draft:/no/such/model"], capsys)
    assert code == 2 and "does not exist" in err


def test_bench_profile_info(exported, capsys, tmp_path):
    d = str(exported["tiny-a"])
    code, out, _ = run(["bench", "--model", d, "--positions", "16", "64", "--steps", "4", "--repeats", "1",
                        "--json", str(tmp_path / "b.json")], capsys)
    assert code == 0 and "cached token at position    16" in out
    assert set(json.loads((tmp_path / "b.json").read_text())["cached_token_ms"]) == {"16", "64"}
    code, out, _ = run(["profile", "--model", d, "--max-seq-len", "100", "--batch-size", "3"], capsys)
    assert code == 0 and f"= {2 * 2 * 4 * 16 * 100 * 3 * 4} bytes" in out and "300 tokens" in out
    code, out, _ = run(["info", "--model", d], capsys)
    assert code == 0 and "com.microsoft.GroupQueryAttention x2" in out and "past_key_0" in out
    assert "inplace layout" in out and "family     : gpt2" in out


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--model", "/no/such/model", "--ids", "1"], "does not exist"),
    (["generate", "--model", "MODEL", "--prompt", "hello"], "tokenizer.json"),
    (["generate", "--model", "MODEL", "--ids", "1", "--max-new-tokens", "500"],
     "lower --max-new-tokens to at most 128"),
    (["generate", "--model", "MODEL", "--ids", "5000"], "outside the vocabulary"),
    (["generate", "--model", "MODEL", "--ids", "1", "--top-p", "2"], "top_p"),
    (["profile", "--model", "MODEL", "--max-seq-len", "4096"], "outside [1, 128]"),
    (["bench", "--model", "MODEL", "--positions", "5000"], "no --positions value"),
])
def test_errors_are_one_line_without_traceback(argv, msg, exported, capsys):
    argv = [str(exported["tiny-a"]) if a == "MODEL" else a for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2 and msg in err and "Traceback" not in err and err.count("\n") == 1


def test_bad_option_values_are_argparse_errors(capsys):
    for argv in (["generate", "--ids", "1,x"], ["generate"], ["nope"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "expected integers" in capsys.readouterr().err


def test_generate_samples_by_default_and_repeats_with_a_seed(exported, capsys):
    from kvcache_infer import KVCacheInferencer
    argv = ["generate", "--model", str(exported["tiny-a"]), "--ids", "1,2,3", "--max-new-tokens", "12", "--seed", "4"]
    code, out, _ = run(argv, capsys)
    want = KVCacheInferencer(exported["tiny-a"]).generate([1, 2, 3], 12, temperature=0.8, top_k=40, seed=4)
    assert code == 0 and [int(x) for x in out.split()] == want


def test_default_model_from_another_directory_and_a_closed_pipe(tmp_path):
    import subprocess
    import sys
    exe = [sys.executable, "-m", "kvcache_infer.cli"]
    r = subprocess.run([*exe, "generate", "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def ") and len(r.stdout) > len("def ")
    cmd = " ".join(exe) + " info --model pybytes | head -1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("model")
