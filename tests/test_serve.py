"""`fmnist serve`: routes, the same answers as `fmnist predict`, bad input, auth, the page in Chromium,
a short load, clean stops. Two servers are started as `fmnist serve` subprocesses and shared."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist_lightning.inference import model_pixels
from tests.helpers import ROOT, ChromiumPage, best_ckpt, free_port, need, subprocess_env, without_module

SHIPPED = Path(__file__).parent / "data"
IMAGES = sorted(SHIPPED.glob("*.png"))
KEY = "test-key-123"
UPLOAD_LIMIT_MB = 1.0


class Server:
    """One `fmnist serve` process group, its port and its log (stdout and stderr)."""

    def __init__(self, ckpt: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.ckpt, self.port, self.log = ckpt, free_port(), log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fmnist_lightning", "serve", "--ckpt", str(ckpt), "--port", str(self.port), *args],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=subprocess_env(OMP_NUM_THREADS="1", **(env or {})),
            start_new_session=True,  # its own process group, as a terminal's job: Ctrl-C reaches all of it
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, headers: dict[str, str] | None = None, timeout_s: float = 90) -> float:
        import requests

        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if requests.get(f"{self.url}/health", headers=headers, timeout=2).status_code == 200:
                    return time.monotonic() - start
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log.read_text()}")

    def tree(self) -> list[int]:
        """The server's processes: the main one and all its descendants (the children of every thread)."""
        pids, found = [self.process.pid], []
        while pids:
            pid = pids.pop()
            found.append(pid)
            try:
                for thread in os.listdir(f"/proc/{pid}/task"):
                    pids += [int(c) for c in Path(f"/proc/{pid}/task/{thread}/children").read_text().split()]
            except OSError:  # it ended meanwhile
                continue
        return found

    def tree_pss_mb(self) -> float:
        """Memory of the server's processes: the sum of their proportional set sizes
        (/proc/PID/smaps_rollup), so pages that forked processes share count once."""
        total = 0
        for pid in self.tree():
            try:
                found = re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.MULTILINE)
            except OSError:
                continue
            total += int(found.group(1)) if found else 0
        return total / 1024

    def cpu_seconds(self, pids: list[int]) -> dict[str, float]:
        """CPU time (user + system, /proc/PID/stat) each of `pids` has used so far, by 'PID command line'."""
        used = {}
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            utime, stime = stat[stat.rindex(")") + 2 :].split()[11:13]  # fields 14 and 15 of proc(5)
            used[f"{pid} {command[:90]}"] = (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
        return used

    def stop(self, sig: signal.Signals) -> int:
        os.killpg(self.process.pid, sig) if sig == signal.SIGINT else self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """Open, batching (the defaults), uploads limited to 1 MB."""
    need("litserve", "serve")
    s = Server(best_ckpt(trained_run), tmp_path_factory.mktemp("serve") / "server.log", "--max-upload-mb", "1")
    s.wait_ready()
    yield s
    s.kill()


def post(url: str, data: bytes, content_type: str = "image/png", **kwargs):
    import requests

    return requests.post(f"{url}/predict", data=data, headers={"Content-Type": content_type}, timeout=30, **kwargs)


def test_routes_and_the_three_ways_to_send_an_image(server: Server) -> None:
    import requests

    assert requests.get(f"{server.url}/health", timeout=5).text == "ok"
    page = requests.get(server.url, timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '"Ankle boot"' in page.text and "<script src" not in page.text and "://" not in page.text  # no CDN
    png = (SHIPPED / "ankle_boot.png").read_bytes()
    raw = post(server.url, png, params={"top_k": 10, "input": 1}).json()
    multipart = requests.post(f"{server.url}/predict", files={"image": ("a.png", png, "image/png")}, timeout=30).json()
    as_json = requests.post(
        f"{server.url}/predict", json={"image": base64.b64encode(png).decode(), "top_k": 3}, timeout=30
    ).json()
    assert raw["class_name"] == "Ankle boot" and raw["class_index"] == 9
    assert multipart == {k: raw[k] for k in ("class_index", "class_name", "probability")}
    assert as_json["top_k"] == raw["top_k"][:3]
    # All ten classes, most probable first, with the model's own probabilities.
    probabilities = [c["probability"] for c in raw["top_k"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sorted(c["class_index"] for c in raw["top_k"]) == list(range(10))
    by_class = [c["probability"] for c in sorted(raw["top_k"], key=lambda c: c["class_index"])]
    assert by_class == pytest.approx(model_probabilities(server.ckpt, SHIPPED / "ankle_boot.png"), abs=1e-5)
    seen = Image.open(io.BytesIO(base64.b64decode(raw["input"].split(",", 1)[1])))
    assert np.array_equal(np.asarray(seen), model_pixels(SHIPPED / "ankle_boot.png"))


def test_serve_answers_as_predict_does(server: Server, trained_run: Path, cli) -> None:
    code, stdout, err = cli("predict", "--ckpt", best_ckpt(trained_run), "--accelerator", "cpu", "--json", *IMAGES)
    assert code == 0, err
    for row, path in zip(json.loads(stdout), IMAGES):
        served = post(server.url, path.read_bytes(), params={"top_k": 3}).json()["top_k"]
        assert [c["class_name"] for c in served] == [c["class"] for c in row["top3"]], path
        assert [c["probability"] for c in served] == pytest.approx([c["probability"] for c in row["top3"]], abs=1e-5)


def _bomb_png(side: int = 12000) -> bytes:
    """A real, valid 144-megapixel black PNG (about 140 KB): a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    squeeze, row = zlib.compressobj(9), bytes(side + 1)  # filter byte 0, then black pixels
    idat = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bad_input_is_refused_in_one_sentence_and_good_input_still_served(server: Server) -> None:
    png = (SHIPPED / "ankle_boot.png").read_bytes()
    bad = {
        "not an image": (b"hello, this is text", "image/png", 400),
        "empty body": (b"", "image/png", 400),
        "truncated PNG": (png[:300], "image/png", 400),
        "144-megapixel PNG": (_bomb_png(), "image/png", 413),
        "over the upload limit": (os.urandom(int(UPLOAD_LIMIT_MB * 1e6) + 1000), "image/png", 413),
        "wrong content type": (png, "text/plain", 415),
        "bad base64 JSON": (b'{"image": "***"}', "application/json", 400),
        "not JSON": (b"{", "application/json", 400),
    }
    good = {path.name: (path.read_bytes(), post(server.url, path.read_bytes()).json()) for path in IMAGES}
    plan = [("bad", kind) for kind in bad] * 13 + [("good", name) for name in good] * 48  # 104 + 96 requests
    plan = [plan[(i * 37) % len(plan)] for i in range(len(plan))]  # mixed (37 is prime to 200)
    assert len(plan) == 200 and len(set(plan)) == len(bad) + len(good)
    log_before = server.log.read_text().count("refused")
    pss_before = server.tree_pss_mb()

    def send(item: tuple[str, str]) -> tuple[str, str, int, dict]:
        which, name = item
        body, kind, _ = bad[name] if which == "bad" else (good[name][0], "image/png", 200)
        response = post(server.url, body, kind)
        return which, name, response.status_code, response.json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, plan))
    pss_after = server.tree_pss_mb()
    statuses = Counter((name, status) for which, name, status, _ in results if which == "bad")
    assert statuses == Counter({(name, expected): 13 for name, (_, _, expected) in bad.items()}), statuses
    for which, name, status, answer in results:
        if which == "good":
            expected = good[name][1]  # the same class; the probability up to float rounding (batches differ)
            assert status == 200 and answer["class_index"] == expected["class_index"], (name, answer)
            assert answer["probability"] == pytest.approx(expected["probability"], abs=1e-5)
        else:  # one sentence
            assert set(answer) == {"detail"} and answer["detail"].endswith(".") and answer["detail"].count(". ") == 0
    # Memory stays bounded: the bomb is refused from its header, the oversized upload after 1 MB.
    print(f"server memory (PSS of all its processes): {pss_before:.0f} MB before, {pss_after:.0f} MB after")
    assert pss_after - pss_before < 150, (pss_before, pss_after)
    log = server.log.read_text()
    assert log.count("refused") - log_before == 104 and "Traceback" not in log
    assert post(server.url, png).json()["class_index"] == good["ankle_boot.png"][1]["class_index"]


def test_short_load_loses_no_request(server: Server) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "serve_load.py"), "--port", str(server.port), "--clients", "8",
         "--seconds", "3", "--expect", "9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["errors"] == report["wrong"] == 0 and report["ok"] == report["requests"] > 0
    assert report["p50_ms"] > 0  # the answered requests' latencies were measured


def test_load_percentiles_are_by_nearest_rank() -> None:
    """The q-th percentile of N latencies is the ceil(q/100 * N)-th smallest, whatever their order."""
    import runpy

    percentile = runpy.run_path(str(ROOT / "scripts" / "serve_load.py"))["percentile"]
    hundred = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unsorted
    assert [percentile(hundred, q) for q in (50, 95, 99, 100)] == [50, 95, 99, 100]
    five = [30.0, 10.0, 50.0, 20.0, 40.0]
    assert [percentile(five, q) for q in (1, 20, 21, 50, 80, 81, 99)] == [10, 10, 20, 30, 40, 50, 50]
    assert percentile([], 50) == 0


IDLE_S = 20.0


def test_an_idle_server_costs_under_1_percent_of_a_core(server: Server) -> None:
    """With no requests, the whole process tree (main, LitServe's manager, HTTP and inference
    processes) uses under 1% of a core: nothing polls in a tight loop (issue 27). After the tests
    above, so the server has served traffic first."""
    time.sleep(3)  # connections of the tests above close, the last answers go out
    pids = server.tree()
    before, start = server.cpu_seconds(pids), time.monotonic()
    time.sleep(IDLE_S)
    after, wall = server.cpu_seconds(pids), time.monotonic() - start
    used = {name: round(after[name] - before[name], 2) for name in after if name in before}
    assert len(used) >= 4, used  # main, manager, HTTP, worker: all of them measured
    print(f"idle server: {sum(used.values()):.2f} s of CPU in {wall:.1f} s")
    assert sum(used.values()) / wall < 0.01, f"{sum(used.values()):.2f} s of CPU in {wall:.0f} s idle: {used}"


def test_load_script_sends_only_to_127_0_0_1() -> None:
    for url in ("http://localhost:8000/predict", "http://10.0.0.1:8000/predict", "https://127.0.0.1/predict"):
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "serve_load.py"), "--url", url, "--seconds", "1"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode != 0 and "refusing" in result.stderr, url


def _chromium_upload(url: str, image: Path, screenshot: Path, profile: Path) -> str:
    """Open the page in headless Chromium, choose `image` in its file input (DevTools protocol), and
    return the predicted class the page shows; a screenshot of the page goes to `screenshot`."""
    with ChromiumPage(url, profile) as page:
        page.wait_for("document.readyState === 'complete' && document.querySelectorAll('.bar').length", "no page")
        root = page.call("DOM.getDocument")["root"]["nodeId"]
        node = page.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        page.call("DOM.setFileInputFiles", nodeId=node, files=[str(image)])
        shown = "document.getElementById('prediction').textContent"
        predicted = page.wait_for(f"{shown} !== '...' && {shown}", "no prediction")
        page.wait_for("document.getElementById('seen').naturalWidth", "no image of what the page sent")
        screenshot.write_bytes(base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]))
        return str(predicted)


def test_page_in_chromium_classifies_an_uploaded_image(server: Server, tmp_path: Path) -> None:
    shot = tmp_path / "serve-page.png"
    predicted = _chromium_upload(server.url + "/", SHIPPED / "pullover_on_white.png", shot, tmp_path / "profile")
    served = post(server.url, (SHIPPED / "pullover_on_white.png").read_bytes()).json()
    assert predicted.startswith(served["class_name"] + " ("), predicted
    assert Image.open(shot).size[0] >= 800
    if target := os.environ.get("FMNIST_SERVE_SCREENSHOT"):  # docs/images/serve-page.png is made this way
        Image.open(shot).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(target, optimize=True)


def test_upload_without_a_length_is_cut_at_the_limit(server: Server) -> None:
    """A chunked upload says no Content-Length: it is refused once the limit's bytes came."""
    chunk = os.urandom(100_000)
    chunks = (chunk for _ in range(int(UPLOAD_LIMIT_MB * 1e6) // len(chunk) + 2))
    answer = post(server.url, chunks)  # a generator: requests sends it chunked
    assert answer.status_code == 413 and answer.json()["detail"].endswith("limit of 1 MB."), answer.text


def test_ctrl_c_stops_the_server_cleanly(server: Server) -> None:
    """Last of the shared server's tests: Ctrl-C (SIGINT to its whole process group) stops it."""
    assert server.stop(signal.SIGINT) == 0
    log = server.log.read_text()
    assert "Traceback" not in log and log.rstrip().endswith("stopped"), log[-2000:]
    assert "open: no API key" in log


def test_api_key_onnxruntime_unbatched_and_sigterm(trained_run: Path, tmp_path: Path) -> None:
    import requests

    need("litserve", "serve")
    need("onnxruntime", "export")
    s = Server(best_ckpt(trained_run), tmp_path / "server.log", "--engine", "onnxruntime", "--max-batch-size", "1",
               env={"FMNIST_SERVE_API_KEY": KEY})  # fmt: skip
    try:
        s.wait_ready()  # /health needs no key: load balancers and Kubernetes probes carry none
        png = (SHIPPED / "ankle_boot.png").read_bytes()
        for headers in ({}, {"X-API-Key": "wrong"}):
            assert requests.get(s.url + "/health", headers=headers, timeout=10).text == "ok"
            for method, path in (("POST", "/predict"), ("GET", "/info")):
                response = requests.request(method, s.url + path, data=png, headers=headers, timeout=10)
                assert response.status_code == 401 and response.json()["detail"].endswith("."), (path, headers)
        page = requests.get(s.url, timeout=5)  # the page itself holds nothing
        assert page.status_code == 200 and '"Ankle boot"' in page.text
        answer = requests.post(
            f"{s.url}/predict?top_k=10", data=png, headers={"X-API-Key": KEY, "Content-Type": "image/png"}, timeout=30
        ).json()
        reference = model_probabilities(best_ckpt(trained_run), SHIPPED / "ankle_boot.png")
        assert [c["probability"] for c in sorted(answer["top_k"], key=lambda c: c["class_index"])] == pytest.approx(
            reference, abs=1e-4
        )
        assert s.stop(signal.SIGTERM) == 0
        log = s.log.read_text()
        assert "Traceback" not in log and log.count("refused") == 4, log
        assert "requests to /predict need the API key" in log, log
    finally:
        s.kill()


def model_probabilities(ckpt: Path, image: Path) -> list[float]:
    from fmnist_lightning.checkpoints import load_classifier
    from fmnist_lightning.inference import class_probabilities, load_image

    return class_probabilities(load_classifier(ckpt), load_image(image).unsqueeze(0))[0].tolist()


def test_averaged_and_bf16_checkpoints_serve_as_predict_reads_them(tmp_path: Path, real_data: None) -> None:
    """EMA and SWA checkpoints hold the averaged weights, a bf16-mixed run fp32 weights; the server
    loads each as `predict` does."""
    import torch

    from fmnist_lightning.serve_app import FashionAPI, ServeOptions
    from fmnist_lightning.settings import Settings
    from fmnist_lightning.training import run_fit

    need("litserve", "serve")
    for averaging, precision in (("ema", "32-true"), ("swa", "32-true"), ("none", "bf16-mixed")):
        out = tmp_path / f"{averaging}-{precision}"
        s = Settings(max_epochs=2, limit_train_batches=3, limit_val_batches=1, offline=True, progress=False,
                     accelerator="cpu", weight_averaging=averaging, swa_start=0.3, logger=("csv",),
                     precision=precision)  # fmt: skip
        run_fit(s, out=out)
        api = FashionAPI(ServeOptions(ckpt=best_ckpt(out)))
        api.setup("cpu")
        pixels = model_pixels(SHIPPED / "pullover_on_white.png").tobytes()
        x = api.decode_request({"pixels": pixels, "top_k": 10, "input": False}, context := {})
        served = api.encode_response(api.predict(api.batch([x]), [context])[0], context)
        expected = model_probabilities(best_ckpt(out), SHIPPED / "pullover_on_white.png")
        by_class = sorted(served["top_k"], key=lambda c: c["class_index"])
        assert [c["probability"] for c in by_class] == pytest.approx(expected, abs=1e-5), (averaging, precision)
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # setup() set it for a worker process


@pytest.mark.parametrize("batch_timeout", [0.005, 0.0])
def test_an_idle_worker_waits_for_requests_instead_of_polling(batch_timeout: float) -> None:
    """The batched loop reads its (empty) queue once per IDLE_WAIT_S, not every millisecond; a lone
    request runs at once; requests waiting together form one batch. This also holds LitServe to
    how its batched loop reads the queue (`_FirstReadWaits` relies on it)."""
    from queue import Queue

    need("litserve", "serve")
    from fmnist_lightning.serve_app import IDLE_WAIT_S, ServeOptions, WaitingBatchedLoop, build_server

    class CountingQueue(Queue):
        reads = 0

        def get(self, block: bool = True, timeout: float | None = None) -> object:
            self.reads += 1
            return super().get(block, timeout)

    api = build_server(ServeOptions(ckpt=Path("x.ckpt"), batch_timeout=batch_timeout)).lit_api
    assert isinstance(api.loop, WaitingBatchedLoop)
    queue = CountingQueue()
    start = time.monotonic()
    assert api.loop.get_batch_requests(api, queue, None) == ([], [])
    assert queue.reads == 1 and time.monotonic() - start >= IDLE_WAIT_S * 0.9
    queue.put((0, "lone", time.monotonic(), b"x"))
    assert api.loop.get_batch_requests(api, queue, None) == ([(0, "lone", b"x")], [])
    for uid in ("a", "b", "c"):
        queue.put((0, uid, time.monotonic(), uid.encode()))
    assert [uid for _, uid, _ in api.loop.get_batch_requests(api, queue, None)[0]] == ["a", "b", "c"]


def test_litserve_details_serve_relies_on_are_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve_app uses LitServe's public API and two details it does not promise: the shutdown event
    that a signal sets (checked here; the queue reads in the test above). A LitServe release that
    changes them fails here. Also: the page is served without removing LitServe's routes, and the
    workers and HTTP processes are two settings."""
    import inspect

    need("litserve", "serve")
    import litserve as ls

    from fmnist_lightning.serve_app import ServeOptions, run_server

    assert "self._shutdown_event.wait()" in inspect.getsource(ls.LitServer.run)
    seen: dict[str, object] = {}

    def run(self: ls.LitServer, **options: object) -> None:  # instead of starting the processes
        seen.update(options, workers=self.workers_per_device, event=self._shutdown_event)
        seen["routes"] = {getattr(route, "path", None) for route in self.app.routes}

    monkeypatch.setattr(ls.LitServer, "run", run)
    run_server(ServeOptions(ckpt=Path("x.ckpt"), workers=3, api_servers=2))
    assert seen["event"] is None  # run() creates it, then waits on it
    assert {"/", "/health", "/info", "/predict"} <= seen["routes"]  # type: ignore[operator]
    assert (seen["workers"], seen["num_api_servers"]) == (3, 2)
    assert ServeOptions(ckpt=Path("x.ckpt")).workers == ServeOptions(ckpt=Path("x.ckpt")).api_servers == 1


def test_serve_without_the_extra_says_so_in_one_line(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    without_module(monkeypatch, "litserve")
    code, _, err = cli("serve", "--ckpt", tmp_path / "x.ckpt")
    assert code == 2 and err.strip().count("\n") == 0
    assert "fmnist serve needs the 'serve' extra (litserve missing)" in err and 'pip install -e ".[serve]"' in err
