"""sai-app answers only its own host (issue 30, case 5) and bounds what one comparison may ask
for (case 7). A real ``sai-app`` process and real HTTP requests, some addressed to another
name (``Host: evil.example``: a page that pointed its domain at 127.0.0.1, DNS rebinding) or
sent by another site's page (``Origin: http://evil.example``)."""

from __future__ import annotations

import json
import socket
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.app.helpers import RUNS, request, serving

EVIL = "evil.example"
PROMPT = "a pencil sketch of <Vthing>"
REFUSED = b"sai-app answers"  # how both refusals start


def _event(config: dict, *, api_name: str | None = None, button: str | None = None):
    """(fn_index, trigger id, input labels) of the event with ``api_name``, or of the click
    of the button labelled ``button``, in the page's ``/config``."""
    components = {c["id"]: c for c in config["components"]}
    for dep in config["dependencies"]:
        target = dep["targets"][0][0]
        named = api_name is not None and dep.get("api_name") == api_name
        if named or (button is not None and components[target]["props"].get("value") == button):
            labels = [components[i]["props"].get("label") for i in dep["inputs"]]
            return dep["id"], target, labels
    raise AssertionError(f"no event {api_name or button!r} in /config")


def _routes(server: str, runs_dir: Path) -> list[tuple[str, str, bytes | None, dict]]:
    """One request to each kind of route the app serves: (method, path, body, headers)."""
    config = json.loads(request(server + "/config")[1])
    compare = [[RUNS["sgd-sai"]], PROMPT, "1", 1, 7.5, 1.0, "", False]
    fn_index, trigger, _ = _event(config, api_name="compare")
    joined = {"data": compare, "fn_index": fn_index, "trigger_id": trigger,
              "session_hash": uuid.uuid4().hex}  # fmt: skip
    boundary = "sai-boundary"
    upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
              f"filename=\"a.txt\"\r\n\r\nnot an image\r\n--{boundary}--\r\n").encode()  # fmt: skip
    as_json = {"Content-Type": "application/json"}
    return [
        ("GET", "/", None, {}),
        ("GET", "/config", None, {}),
        ("GET", "/gradio_api/info", None, {}),
        ("GET", f"/gradio_api/file={runs_dir / RUNS['sgd-sai'] / 'run.yaml'}", None, {}),
        ("POST", "/gradio_api/upload", upload,
         {"Content-Type": f"multipart/form-data; boundary={boundary}"}),
        ("POST", "/gradio_api/call/compare", json.dumps({"data": compare}).encode(), as_json),
        ("POST", "/gradio_api/queue/join", json.dumps(joined).encode(), as_json),
    ]  # fmt: skip


def _grids(runs_dir: Path) -> list[Path]:
    """The grids the app has drawn (its temporary folder lies beside the runs folder)."""
    return sorted(runs_dir.parent.glob("sai-app-*/compare-*.png"))


@pytest.mark.parametrize("sent", ["host", "origin"])
def test_a_foreign_host_or_origin_is_refused_on_every_route(server, runs_dir, sent):
    """Addressed to evil.example, or sent by its page, every route (the page, /config, the
    API's info, a runs file, an upload, /compare by its API name and through the queue)
    answers 400 with one plain line, and no grid is drawn."""
    port = urllib.parse.urlsplit(server).port
    foreign = {"Host": f"{EVIL}:{port}"} if sent == "host" else {"Origin": f"http://{EVIL}"}
    drawn = _grids(runs_dir)
    for method, path, body, headers in _routes(server, runs_dir):
        status, answer = request(server + path, method=method, data=body,
                                 headers={**headers, **foreign})  # fmt: skip
        assert (status, answer[: len(REFUSED)]) == (400, REFUSED), (path, status, answer[:200])
        assert answer.count(b"\n") == 1 and EVIL.encode() in answer
    assert _grids(runs_dir) == drawn


def test_the_same_requests_from_this_machine_are_answered(server, runs_dir):
    """127.0.0.1, localhost and [::1] (with or without the port), and the app's own page as
    Origin: every route answers, and each compare call draws its grid."""
    port = urllib.parse.urlsplit(server).port
    senders = [{"Host": f"127.0.0.1:{port}"}, {"Host": "localhost"},
               {"Host": f"[::1]:{port}", "Origin": f"http://[::1]:{port}"},
               {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}]  # fmt: skip
    drawn = len(_grids(runs_dir))
    for sender in senders:
        for method, path, body, headers in _routes(server, runs_dir):
            status, answer = request(server + path, method=method, data=body,
                                     headers={**headers, **sender})  # fmt: skip
            assert status == 200, (sender, path, status, answer[:200])
            if path.endswith("/call/compare"):  # wait for each grid
                event = json.loads(answer)["event_id"]
                assert _called(server, f"/gradio_api/call/compare/{event}")[0] == "complete"
            elif path.endswith("/queue/join"):
                assert _outcome(server, json.loads(body)["session_hash"])["success"]
    assert len(_grids(runs_dir)) == drawn + 2 * len(senders)


def _called(server: str, path: str) -> tuple[str, str]:
    """The last event (``complete`` or ``error``) and its data, of a REST API call's stream."""
    with urllib.request.urlopen(server + path, timeout=60) as stream:
        lines = stream.read().decode().splitlines()
    events = [line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")]
    data = [line.split(":", 1)[1].strip() for line in lines if line.startswith("data:")]
    return events[-1], data[-1]


def _train(server: str, config: dict, form: dict[str, str], headers: dict):
    """The Train tab's "Start training" by fn_index, as a page would send it: the status,
    the answer and the session to read the outcome with."""
    fn_index, trigger, labels = _event(config, button="Start training")
    session = uuid.uuid4().hex
    body = {"data": [form.get(label, "") for label in labels], "fn_index": fn_index,
            "trigger_id": trigger, "session_hash": session}  # fmt: skip
    status, answer = request(f"{server}/gradio_api/queue/join", method="POST",
                             data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json", **headers})  # fmt: skip
    return status, answer, session


def _outcome(server: str, session_hash: str) -> dict:
    """The queue's last message for ``session_hash`` (``process_completed``)."""
    url = f"{server}/gradio_api/queue/data?session_hash={session_hash}"
    with urllib.request.urlopen(url, timeout=60) as stream:
        for line in stream:
            if line.startswith(b"data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the queue closed before the event completed")


def test_the_training_endpoint_starts_nothing_for_a_foreign_page(
    server, runs_dir, tiny_pipeline_dir
):
    """The Train tab's handler, hidden from the API page but callable by fn_index: a call
    with a foreign Host or Origin is refused and no run folder appears; the same call from
    the app's own page reaches the handler (which answers an empty concept itself)."""
    port = urllib.parse.urlsplit(server).port
    config = json.loads(request(server + "/config")[1])
    form = {"Concept": str(runs_dir.parent / "concept" / "thing.yaml"),
            "Base model": str(tiny_pipeline_dir), "Optimizer": "sgd-sai", "Max steps": "1",
            "Resolution": "32", "Run folder": "from-evil"}  # fmt: skip
    for foreign in ({"Host": f"{EVIL}:{port}"}, {"Origin": f"http://{EVIL}:{port}"}):
        status, answer, _ = _train(server, config, form, foreign)
        assert (status, answer[: len(REFUSED)]) == (400, REFUSED), answer[:200]

    status, _, session = _train(server, config, {"Optimizer": "sgd-sai"}, {"Origin": server})
    assert status == 200
    assert "Train: choose a concept" in _outcome(server, session)["output"]["error"]
    assert not (runs_dir / "from-evil").exists()


def test_on_all_interfaces_this_machines_names_are_answered_and_other_sites_are_not(tmp_path):
    """--host 0.0.0.0: Host may also be this machine's name or any IP address (a rebinding
    page always uses a domain name), never another name; Origin must still be this machine
    or the name in Host."""
    runs = tmp_path / "runs"
    runs.mkdir()
    name = socket.gethostname()
    with serving(runs, "--host", "0.0.0.0") as url:
        port = urllib.parse.urlsplit(url).port
        cases = [
            ({"Host": f"{name}:{port}"}, 200),
            ({"Host": f"{name}:{port}", "Origin": f"http://{name}:{port}"}, 200),
            ({"Host": f"192.0.2.7:{port}", "Origin": f"http://192.0.2.7:{port}"}, 200),
            ({"Host": f"127.0.0.1:{port}", "Origin": f"http://localhost:{port}"}, 200),
            ({"Host": f"{EVIL}:{port}"}, 400),
            ({"Host": f"{name}:{port}", "Origin": f"http://{EVIL}"}, 400),
            ({"Host": f"192.0.2.7:{port}", "Origin": "http://192.0.2.99"}, 400),
            ({"Host": f"127.0.0.1:{port}", "Origin": "null"}, 400),
        ]
        for headers, expected in cases:
            status, answer = request(url + "/config", headers=headers)
            assert status == expected, (headers, status, answer[:200])


def test_compare_refuses_what_no_grid_should_draw(server):
    """A prompt with a line break or over 1,000 characters (the issue's 200,000 newlines
    among them), more than 16 seeds, a seed of 2**63 or more and one that is not a whole
    number are each one message, before any model loads."""
    from gradio_client import Client

    client = Client(server, verbose=False)
    run, settings = [RUNS["sgd-sai"]], (1, 7.5, 1.0, "")
    cases = [
        ("a photo of {token}\nand more", "1", "Prompt: write it on one line"),
        (PROMPT, "99999999999999999999999", "Seeds: '99999999999999999999999' is too large"),
        (PROMPT, str(2**63), "2\\*\\*63 - 1"),
        ("\n" * 200_000, "1", "Prompt: at most 1,000 characters, got 200,000"),
        ("x" * 1_001, "1", "Prompt: at most 1,000 characters"),
        (PROMPT, ",".join(map(str, range(17))), "Seeds: at most 16"),
        (PROMPT, "1.5", "Seeds: '1.5' is not a seed"),
    ]
    for prompt, seeds, message in cases:
        with pytest.raises(Exception, match=message) as err:
            client.predict(run, prompt, seeds, *settings, api_name="/compare")
        assert "Traceback" not in str(err.value)
    with pytest.raises(Exception, match="Negative prompt: write it on one line"):
        client.predict(run, PROMPT, "1", 1, 7.5, 1.0, "blurry\nugly", api_name="/compare")
