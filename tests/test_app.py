"""`opendit app`: the /generate API through gradio_client on a server started in-process (bundled demo model),
its errors, its queue, and the sidecar that reproduces a video."""

import json
import sys
from pathlib import Path

import av
import pytest

pytest.importorskip("gradio", reason="the [app] extra (gradio) is not installed")
pytest.importorskip("gradio_client", reason="the [app] extra (gradio_client) is not installed")

from app_server import FAST, start_app  # noqa: E402
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from opendit.app import main, read_sidecar  # noqa: E402

PROMPT = "a red circle moving to the right on a black background"
CACHE_DEFAULTS = {"pab": False, "step_cache": "none", "step_cache_threshold": 0.1}  # the step caches: off


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    out = tmp_path_factory.mktemp("app_out")
    url, generator, page = start_app(out)
    yield {"client": Client(url, verbose=False), "generator": generator, "out": out}
    page.close()


def decode(path) -> list:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def generate(app, prompt=PROMPT, **kwargs):
    """(mp4 path, settings) of one /generate call, with the tiny defaults of these tests."""
    return app["client"].predict(prompt, **{**FAST, **kwargs}, api_name="/generate")


def test_generate_returns_an_mp4_of_the_asked_size_and_a_sidecar(app):
    video, settings = generate(app, seed=3, num_frames=6, height=32, width=16)
    frames = decode(video)
    assert len(frames) == 6 and frames[0].shape == (32, 16, 3)
    args = {"prompt": PROMPT, "seed": 3, "height": 32, "width": 16, "num_frames": 6, "num_inference_steps": 5,
            "guidance_scale": 7.0, "scheduler": "iddpm", **CACHE_DEFAULTS}
    assert settings["arguments"] == args and settings["fps"] == 8
    saved = app["out"] / settings["video"]
    assert saved.read_bytes() == Path(video).read_bytes() and (app["out"] / settings["preview"]).is_file()
    assert read_sidecar(saved.with_suffix(".json")) == args


def test_prompt_alone_takes_the_models_defaults_and_a_random_seed(app):
    client, defaults = app["client"], app["generator"].defaults
    assert defaults == {"height": 32, "width": 32, "num_frames": 8, "num_inference_steps": 50, "guidance_scale": 7.0,
                        "scheduler": "iddpm", **CACHE_DEFAULTS}
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]
    params = {p["parameter_name"]: p for p in info["parameters"]}
    assert list(params)[:2] == ["prompt", "seed"] and not params["prompt"]["parameter_has_default"]
    assert all(params[k]["parameter_default"] == v for k, v in defaults.items())
    assert params["seed"]["parameter_default"] == -1  # random
    video, settings = client.predict(PROMPT, num_inference_steps=3, api_name="/generate")  # steps: keep it quick
    assert len(decode(video)) == 8 and settings["arguments"]["seed"] >= 0


@pytest.mark.parametrize("request_, message", [
    (dict(prompt="   "), "the prompt is empty"),
    (dict(height=30), "not divisible by the patch size 4"),
    (dict(width=1024), "greater than maximum value 64"),
    (dict(num_inference_steps=100000), "greater than maximum value 200"),
    (dict(num_frames=0), "less than minimum value 2"),
    (dict(scheduler="euler"), "not in the list of choices"),
    (dict(step_cache="pab"), "not in the list of choices"),
    (dict(step_cache_threshold=-0.5), "less than minimum value 0"),
])
def test_bad_request_is_a_readable_error_and_the_server_keeps_serving(app, request_, message):
    with pytest.raises(AppError, match=message):
        generate(app, **request_)
    video, _ = generate(app, num_inference_steps=2)
    assert len(decode(video)) == 8


def test_concurrent_requests_both_succeed_one_generation_at_a_time(app):
    pipe = app["generator"].pipe
    calls = pipe.calls
    client = app["client"]
    jobs = [client.submit(f"a {c} circle moving up on a black background", **FAST, seed=i, api_name="/generate")
            for i, c in enumerate(["blue", "green"])]
    results = [job.result(timeout=120) for job in jobs]
    assert [len(decode(video)) for video, _ in results] == [8, 8]
    assert pipe.calls == calls + 2 and pipe.peak == 1  # queued: never two generations at once


def test_sidecar_reproduces_the_same_mp4(app):
    video, settings = generate(app, seed=-1, num_inference_steps=4)
    sidecar = (app["out"] / settings["video"]).with_suffix(".json")
    again = app["generator"].generate(**read_sidecar(sidecar), progress=False)
    assert again.video != app["out"] / settings["video"]
    assert again.video.read_bytes() == Path(video).read_bytes()
    assert json.loads(again.sidecar.read_text())["arguments"] == settings["arguments"]


def test_python_callers_get_the_same_checks(app):
    generator = app["generator"]
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in 2\.\.200, got 2\.5"):
        generator.arguments(PROMPT, num_inference_steps=2.5)
    with pytest.raises(ValueError, match="unknown option"):
        generator.arguments(PROMPT, sampler="ddim")
    with pytest.raises(ValueError, match="seed must be"):
        generator.arguments(PROMPT, seed=-5)
    with pytest.raises(ValueError, match="pab must be true or false, got 1"):
        generator.arguments(PROMPT, pab=1)
    options = {o.name: o for o in generator.options}
    assert options["step_cache"].choices == ("none", "teacache", "fbcache")  # the demo model is calibrated
    result = generator.generate(PROMPT, seed=0, progress=False, num_inference_steps=6, pab=True, step_cache="fbcache",
                                step_cache_threshold=1.0)
    assert generator.pipe.cache_stats.computed["steps"] < 6 and result.record["arguments"]["pab"] is True
    args = generator.arguments(f"  {PROMPT} ", seed=None, height=16.0)
    assert args["prompt"] == PROMPT and args["height"] == 16 and isinstance(args["height"], int)


def test_without_gradio_one_line_says_to_install_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert main([]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install -e ".[app]"' in err


def test_cli_lists_app(capsys):
    from opendit.cli import main as cli_main

    assert cli_main(["--help"]) == 0
    assert "app " in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--concurrency", "0"], "--concurrency must be >= 1"),
    (["--port", "70000"], "--port must be in 1..65535"),
    (["--examples", "no_such_file.txt"], "--examples no_such_file.txt: file not found"),
])
def test_bad_serving_flags_are_one_line_errors_before_loading(flags, message, capsys):
    assert main(flags) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"opendit app: error: {message}") and "\n" not in err
