"""The README's benchmark commands start exactly as written: ``.venv/bin/python bench/<name>.py``.

Run as scripts (not ``python -m``) from the repository root, with no PYTHONPATH, on the tiny
EmbeddingGemma-architecture model so that each finishes in seconds; the full-size build and
runs stay out of CI.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_COMMANDS = (
    "bench/service.py",
    "bench/quantization.py",
    "bench/build_full_gemma.py",
    "bench/load_memory.py",
    "bench/gemma_builder.py",
    "bench/graph.py",
    "bench/request_cpu.py",
    "bench/syscalls.py",
)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _table_rows(output: str, first_column: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines() if line.split()[:1] == [first_column]]


def test_it_lists_every_command_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for command in README_COMMANDS:
        assert f".venv/bin/python {command}" in readme, command


@pytest.mark.parametrize("script", README_COMMANDS)
def test_it_starts_each_bench_script_as_written(script: str) -> None:
    completed = _run(script, "--help")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage:"), completed.stdout


def test_it_keeps_an_already_built_model(gemma_tiny_path: Path) -> None:
    completed = _run("bench/build_full_gemma.py", str(gemma_tiny_path))
    assert completed.returncode == 0, completed.stderr
    assert "already built" in completed.stdout


def test_it_reports_speed_and_accuracy_per_mode(gemma_tiny_path: Path) -> None:
    completed = _run(
        "bench/quantization.py",
        *("--model", str(gemma_tiny_path), "--modes", "fp32,int8"),
        *("--seconds", "0.05", "--threads", "1"),
    )
    assert completed.returncode == 0, completed.stderr
    assert "failed" not in completed.stdout, completed.stdout
    rows = _table_rows(completed.stdout, gemma_tiny_path.name)
    assert [row[1] for row in rows] == ["fp32", "int8"], completed.stdout
    assert all(row[-1] == "ok" for row in rows), completed.stdout


def test_it_reports_load_memory_per_mode(gemma_tiny_path: Path) -> None:
    completed = _run(
        "bench/load_memory.py",
        *("--model", str(gemma_tiny_path), "--modes", "fp32,bf16,int8", "--threads", "1"),
    )
    assert completed.returncode == 0, completed.stderr
    for mode in ("fp32", "bf16", "int8"):
        rows = _table_rows(completed.stdout, mode)
        assert len(rows) == 1, completed.stdout
        base, peak, settled = (float(value) for value in rows[0][4:7])
        assert 0 < base <= peak, completed.stdout
        assert 0 < settled <= peak, completed.stdout


def test_it_measures_only_the_stack_ceiling_when_asked_against_a_baseline_in_turns() -> None:
    completed = _run(
        "bench/service.py",
        *("--ceiling-only", "--database", "sqlite", "--seconds", "2", "--clients", "2"),
        *("--baseline", str(ROOT), "--rounds", "2"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "in-process encode" not in completed.stdout
    assert "failed requests" not in completed.stdout, completed.stdout
    rates = {
        line.split("  ")[1].strip(): float(line.split("req/s")[0].split()[-1])
        for line in completed.stdout.splitlines()
        if "req/s  p50" in line
    }
    assert set(rates) == {
        "service, near-free encoder (baseline)",
        "service, near-free encoder (this checkout)",
        "bare server, no model",
    }
    assert all(rate > 0 for rate in rates.values()), completed.stdout
    # Each service's worker CPU by thread, the threads named from py-spy's dump.
    threads = [line for line in completed.stdout.splitlines() if "workers' threads" in line]
    assert len(threads) == 2, completed.stdout
    for line in threads:
        assert "request threads" in line, line
        assert "embed-batcher" in line, line
    # The same code on both sides, in turns: the ratio and its rounds are printed, near 1.
    summary = next(line for line in completed.stdout.splitlines() if "the baseline's" in line)
    ratio = float(summary.split("serves ")[1].split("x")[0])
    assert 0.2 < ratio < 5, summary
    assert "(rounds: " in summary, summary
    assert "less CPU per request" in summary, summary
    # What the load generator itself cost, on the same cores.
    clients = [float(line.split("(the clients: ")[1].split()[0]) for line in rates_lines(completed)]
    assert len(clients) == 3, completed.stdout
    assert all(cost > 0 for cost in clients), completed.stdout


def test_it_counts_system_calls_and_context_switches_per_request_against_a_baseline() -> None:
    completed = _run(
        "bench/syscalls.py",
        *("--database", "sqlite", "--seconds", "2", "--clients", "2", "--baseline", str(ROOT)),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "failed requests" not in completed.stdout, completed.stdout
    rows = {
        fields[0]: fields[1:] for fields in map(str.split, completed.stdout.splitlines()) if fields
    }
    for name in ("requests_per_s", "cpu_us", "context-switches", "futex", "sendto"):
        this, baseline = (float(value) for value in rows[name])
        assert this > 0, completed.stdout
        assert baseline > 0, completed.stdout


def rates_lines(completed: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in completed.stdout.splitlines() if "req/s  p50" in line]


class _Answering(http.server.BaseHTTPRequestHandler):
    """Answers every 4th POST 429, the rest 200; with `close` set, closes the connection after
    each answer, which has no Content-Length."""

    protocol_version = "HTTP/1.1"
    close = False
    answered = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).answered += 1
            status = 429 if type(self).answered % 4 == 0 else 200
        body = b'{"embedding": [0.1]}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Server-Timing", "auth;dur=0.50, ratelimit;dur=0.25, model;dur=3.00")
        if self.close:  # as gunicorn's sync workers answer: no length, the body ends with it
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = self.close

    def log_message(self, *_args: object) -> None:
        pass


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection: close"])
def test_it_loads_a_server_from_one_thread_and_says_what_that_cost(close: bool) -> None:
    from bench import raw_load

    handler: type[_Answering] = type("Handler", (_Answering,), {"close": close, "answered": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        port = server.server_address[1]
        requests = raw_load.prebuilt_requests(
            ["first text", "second text"], host="127.0.0.1", port=port, path="/embed", token="t"
        )
        run = raw_load.run(
            url, requests, clients=3, seconds=0.5, timed_phases=("auth", "ratelimit")
        )
    finally:
        server.shutdown()
        server.server_close()

    assert run["requests"] > 10
    assert run["requests"] + len(run["failures"]) == handler.answered
    assert run["failures"]
    assert all(failure.startswith("429 ") for failure in run["failures"])
    assert 0 < run["p50"] <= run["p99"]
    assert run["client_cpu_us"] > 0
    assert run["phases_p50"] == pytest.approx(0.75)  # the phases asked for, from Server-Timing


def test_it_reads_the_cpu_a_service_process_tree_spent() -> None:
    from bench.cpu_profile import cpu_seconds_by_process

    busy = subprocess.Popen(
        [
            sys.executable,
            "-c",
            # Spins 0.6 s for a 0.5 s check: /proc counts whole clock ticks, sampled, and can
            # read a little under what the process clock says (0.49 for 0.5, in one CI run).
            "import time\nend = time.process_time() + 0.6\n"
            "while time.process_time() < end: pass\ninput()",
        ],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while cpu_seconds_by_process(busy.pid)["gunicorn"] < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        spent = cpu_seconds_by_process(busy.pid)
    finally:
        busy.communicate("\n", timeout=30)
    assert 0.5 <= spent["gunicorn"] < 5
    assert set(spent) == {"gunicorn", "PostgreSQL", "Redis"}


def test_it_starts_the_bare_server_with_every_worker_answering() -> None:
    import json
    import urllib.request

    from bench.service import start_bare, stop

    process, url = start_bare({"BARE_MODEL": "free"}, workers=2)
    try:
        pids = set()
        for _ in range(20):  # sync workers close every connection: each request may land anywhere
            with urllib.request.urlopen(url, timeout=30) as response:
                pids.add(json.loads(response.read())["pid"])
        request = urllib.request.Request(
            url, data=json.dumps({"texts": ["a", "b", "c"]}).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            vectors = json.loads(response.read())["embeddings"]
    finally:
        stop(process)
    assert process.pid not in pids, "workers answer, not the arbiter"
    assert 1 <= len(pids) <= 2
    assert [len(vector) for vector in vectors] == [384, 384, 384]


def test_it_runs_each_bare_worker_on_one_torch_thread_whatever_the_service_would_take() -> None:
    # Loading the model sizes torch's threads for the service's own workers (all the cores for
    # one worker); two bare workers with two threads each spin OpenMP threads against each
    # other and slow every pass 5-10x, which made the yardstick meaningless.
    import json
    import urllib.request

    from bench.service import start_bare, stop
    from embeddings.encoder import bundled_model_path

    environment = {"BARE_MODEL": str(bundled_model_path()), "BARE_QUANTIZATION": "fp32"}
    process, url = start_bare({**environment, "TORCH_THREADS": "2"}, workers=1)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            about = json.loads(response.read())
    finally:
        stop(process)
    assert about["torch_threads"] == 1


def test_it_times_the_eager_and_the_traced_pass_of_the_gemma_architecture(
    gemma_tiny_path: Path,
) -> None:
    completed = _run(
        "bench/graph.py",
        "--model",
        str(gemma_tiny_path),
        "--quantization",
        "fp32",
        "--batches",
        "1,2",
        "--busy",
        "0,1",
        "--seconds",
        "0.2",
    )
    assert completed.returncode == 0, completed.stderr
    rows = [line.split() for line in completed.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [(row[0], row[1]) for row in rows] == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    for _texts, _busy, eager_ms, traced_ms, ratio in (row[:5] for row in rows):
        assert float(eager_ms) > 0
        assert float(traced_ms) > 0
        assert float(ratio.rstrip("x")) == pytest.approx(
            float(eager_ms) / float(traced_ms), rel=0.02
        )


def test_it_breaks_a_requests_cpu_down_by_step_of_the_metered_path(gemma_tiny_path: Path) -> None:
    completed = _run("bench/request_cpu.py", "--model", str(gemma_tiny_path), "--requests", "60")
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    steps = {
        line.split(maxsplit=1)[1].strip(): float(line.split()[0])
        for line in lines
        if line[:12].strip().replace(".", "").isdigit()
    }
    for step in (
        "request",
        "view",
        "Supabase JWT",
        "both windows, one round trip (cache)",
        "validation (serializer)",
        "tokenization",
        "model and charge, one wait",
        "rest of HTTP handler, middleware",
        "embed-batcher",
        "charge-writer",  # the model's answer queued each charge for the writer thread
    ):
        assert steps[step] > 0, (step, completed.stdout)
    # The steps nest: a parent's time covers its children's.
    assert steps["request"] >= steps["view"] >= steps["handler"] >= steps["tokenization"]
    assert (
        steps["model and charge, one wait"]
        >= steps["charge settled (alone where its group charged nothing)"]
    )
