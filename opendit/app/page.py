"""The gradio page of `opendit app`: a prompt and the sampling controls, the video with its settings, the session's
gallery. Its Generate event is also the HTTP API ``/generate`` (prompt first, every other input optional)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import gradio as gr
import torch

from opendit.app.generate import Option, VideoGenerator, model_description

CSS = """
.opendit-video video, .opendit-gallery video, .opendit-gallery img { image-rendering: pixelated; }
"""


def control_rows(options: list[Option]) -> list[gr.Slider | gr.Dropdown | gr.Checkbox]:
    """A slider per option (a dropdown for a choice among names, a checkbox for a switch), two to a row, in the
    options' order."""
    sliders = []
    for i in range(0, len(options), 2):
        with gr.Row():
            sliders += [gr.Dropdown(list(o.choices), value=o.default, label=o.label, info=o.info) if o.choices else
                        gr.Checkbox(value=o.default, label=o.label, info=o.info) if o.kind is bool else
                        gr.Slider(o.minimum, o.maximum, value=o.default, step=o.step, label=o.label, info=o.info)
                        for o in options[i:i + 2]]
    return sliders


def with_signature(fn, names: list[str]):
    """``fn(*values, progress)`` given named parameters: the API documents and takes them by these names, and
    gradio finds the progress tracker (which follows the scheduler's tqdm bar, one tick per denoising step)."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    default=gr.Progress(track_tqdm=True)))
    fn.__signature__ = inspect.Signature(params)
    return fn


def build_page(generator: VideoGenerator, examples: list[str]) -> gr.Blocks:
    """The page for ``generator``'s model; ``examples``: prompts offered under the prompt box."""
    names = [o.name for o in generator.options]

    def generate(prompt, seed, *values):
        *values, _progress = values  # gr.Progress: only its presence matters (it follows tqdm)
        try:
            result = generator.generate(prompt, seed, progress=True, **dict(zip(names, values)))
        except ValueError as e:  # bad input: a readable message in the page and in the API's answer
            raise gr.Error(str(e), print_exception=False) from None
        except torch.OutOfMemoryError:
            raise gr.Error("out of memory: try fewer frames or a smaller size") from None
        return str(result.video), result.record

    def remember(settings: dict, history: list[dict]):
        # the record as written on disk (the page's copy comes back from the browser: only its file name is used)
        sidecar = generator.output_dir / Path(settings["video"]).with_suffix(".json").name
        history = [json.loads(sidecar.read_text(encoding="utf-8")), *history]
        return [(str(generator.output_dir / r["preview"]), caption(r)) for r in history], history

    def recall(history: list[dict], evt: gr.SelectData):
        record = history[evt.index]
        args = record["arguments"]
        video_path = str(generator.output_dir / record["video"])
        return (video_path, record, args["prompt"], args["seed"], *(args[n] for n in names))

    with gr.Blocks(title="OpenDiT", analytics_enabled=False) as page:
        history = gr.State([])  # the session's records, newest first
        gr.Markdown(f"## OpenDiT · text to video\n{model_description(generator.pipe)}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder=examples[0], autofocus=True)
                button = gr.Button("Generate", variant="primary")
                gr.Examples([[p] for p in examples], inputs=[prompt], label="Examples")
                with gr.Group():
                    seed = gr.Number(label="Seed", value=-1, precision=0, minimum=-1,
                                     info="-1: a random seed (the one used is in the settings)")
                    controls = control_rows(generator.options)
            with gr.Column(scale=1):
                video = gr.Video(label="Video", autoplay=True, loop=True, buttons=["download"], interactive=False,
                                 height=360, elem_classes="opendit-video")
                settings = gr.JSON(label="Settings")
        gallery = gr.Gallery(label="This session: click one to show it and put its settings back", columns=8,
                             height=180, object_fit="contain", fit_columns=False, allow_preview=False,
                             interactive=False, elem_classes="opendit-gallery")

        inputs = [prompt, seed, *controls]
        event = button.click(with_signature(generate, ["prompt", "seed", *names]), inputs, [video, settings],
                             api_name="generate", show_progress_on=[video])
        event.success(remember, [settings, history], [gallery, history], api_visibility="private")
        gallery.select(recall, [history], [video, settings, *inputs], api_visibility="private")
    return page


def caption(record: dict) -> str:
    return f"seed {record['arguments']['seed']} · {record['arguments']['prompt']}"


def launch(page: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, concurrency: int = 1,
           share: bool = False, allowed_paths: list[str] | None = None, block: bool = True) -> gr.Blocks:
    """Serve ``page``: requests wait in one queue and at most ``concurrency`` generations run at once (1: never
    two on one GPU). ``block`` False returns once serving (tests). Errors are shown to the page and API."""
    page.queue(default_concurrency_limit=concurrency)
    page.launch(server_name=host, server_port=port, share=share, show_error=True, allowed_paths=allowed_paths,
                prevent_thread_lock=not block, quiet=not block, css=CSS, footer_links=["api"])
    return page
