"""Data reading is never silently wrong (issue 25): unclosed quotes, text encodings and header layouts, through
``read_csv`` and the ``opendit prepare`` command line (CPU, seconds)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from opendit.data.csvfile import DataError, read_csv
from opendit.data.prepare import main
from opendit.data.video import write_video


def rows_csv(n: int = 20, header: str = "path,text") -> list[str]:
    return [header] + [f"clips/c{i}.mp4,caption number {i}" for i in range(n)]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# --------------------------------------------------------------------------------------------------------------
# Quotes
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("closing_line", [None, 12])
def test_unclosed_quote_is_an_error_naming_the_line_never_fewer_rows(tmp_path, capsys, closing_line):
    lines = rows_csv(20)
    lines[5] = 'clips/c4.mp4,"a caption that opens a quote and never closes it'  # line 6 of the file
    if closing_line is not None:  # a stray quote further down closes it: csv would merge lines 6..12 silently
        lines[closing_line - 1] = 'clips/c10.mp4,a caption ending in a quote"'
    path = tmp_path / "quote.csv"
    path.write_text("\n".join(lines) + "\n")
    reach = "the end of the file" if closing_line is None else f"line {closing_line}"
    with pytest.raises(DataError) as info:
        read_csv(path)
    assert str(info.value).startswith(f"{path}:6: unclosed quote") and reach in str(info.value)

    for command in (["info", "--data", str(path)], ["filter", "--data", str(path), "--out", str(tmp_path / "o.csv")]):
        code, out, err = run_cli(command, capsys)
        assert_one_line_error(code, err, f"{path}:6: unclosed quote")
        assert out == ""
    assert not (tmp_path / "o.csv").exists()


def test_quotes_that_close_on_their_line_and_crlf_files_read_normally(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_bytes(b'path,text\r\na.mp4,"a cat, walking"\r\nb.mp4,"she said ""hi"""\r\nc.mp4,a 5" screen\r\n')
    assert [r["text"] for r in read_csv(path)] == ["a cat, walking", 'she said "hi"', 'a 5" screen']


def test_classic_mac_line_ends_read_as_before(tmp_path):
    """A lone \\r ends a line (Excel's "CSV (Macintosh)"), as open(newline="") read it before the one-line rule."""
    path = tmp_path / "mac.csv"
    path.write_bytes(b"a.mp4,a cat\rb.mp4,a dog\r")
    assert [r["text"] for r in read_csv(path)] == ["a cat", "a dog"]
    path.write_bytes(b'a.mp4,"a cat\rb.mp4,a dog\r')
    with pytest.raises(DataError, match=r"mac.csv:1: unclosed quote.* runs to the end of the file"):
        read_csv(path)


def test_unclosed_quote_in_a_captions_file_is_an_error(tmp_path, capsys):
    folder = tmp_path / "videos"
    write_video(folder / "a.mp4", np.full((4, 16, 16, 3), 90, np.uint8), fps=8)
    captions = tmp_path / "captions.csv"
    captions.write_text('name,caption\na.mp4,"an open quote\nb.mp4,a second clip\n')
    code, _, err = run_cli(["csv", "--videos", str(folder), "--captions", str(captions),
                            "--out", str(tmp_path / "data.csv")], capsys)
    assert_one_line_error(code, err, f"{captions}:2: unclosed quote")


# --------------------------------------------------------------------------------------------------------------
# Encodings
# --------------------------------------------------------------------------------------------------------------

def test_latin1_csv_is_an_error_naming_file_line_and_byte_and_reads_with_encoding(tmp_path, capsys):
    folder = tmp_path / "clips"
    write_video(folder / "c0.mp4", np.full((6, 16, 16, 3), 90, np.uint8), fps=8)
    path = tmp_path / "latin1.csv"
    path.write_bytes("path,text\nclips/c0.mp4,un caf\xe9 au bord de l'eau\n".encode("latin-1"))
    expected = f"{path}:2: not valid utf-8 text (byte 0xe9 at offset 29)"  # "path,text\nclips/c0.mp4,un caf" is 29
    with pytest.raises(DataError, match=f"^{re.escape(expected)}"):
        read_csv(path)
    assert read_csv(path, encoding="latin-1")[0]["text"] == "un café au bord de l'eau"

    code, _, err = run_cli(["info", "--data", str(path)], capsys)
    assert_one_line_error(code, err, f"{path}:2: not valid utf-8", "--encoding")
    code, out, _ = run_cli(["info", "--data", str(path), "--encoding", "latin-1"], capsys)
    assert code == 0 and "1 rows: 1 videos" in out
    out_csv = tmp_path / "kept.csv"
    code, out, _ = run_cli(["filter", "--data", str(path), "--out", str(out_csv), "--encoding", "latin-1",
                            "--min_frames", "2"], capsys)
    assert code == 0 and read_csv(out_csv)[0]["text"] == "un café au bord de l'eau"  # written back as UTF-8
    code, _, err = run_cli(["info", "--data", str(path), "--encoding", "klingon"], capsys)
    assert_one_line_error(code, err, "--encoding 'klingon': unknown text encoding")


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffpath,text\na.mp4,un café\n".encode("utf-8"))
    assert read_csv(path)[0]["text"] == "un café"


def test_latin1_sidecar_and_captions_file_are_errors_or_decoded_with_encoding(tmp_path, capsys):
    folder = tmp_path / "videos"
    write_video(folder / "a.mp4", np.full((4, 16, 16, 3), 90, np.uint8), fps=8)
    sidecar = folder / "a.txt"
    sidecar.write_bytes("first line\nune cr\xeape br\xfbl\xe9e\n".encode("latin-1"))
    out = tmp_path / "data.csv"
    code, _, err = run_cli(["csv", "--videos", str(folder), "--out", str(out)], capsys)
    assert_one_line_error(code, err, f"{sidecar}:2: not valid utf-8 text (byte 0xea")
    assert not out.exists()
    code, _, _ = run_cli(["csv", "--videos", str(folder), "--out", str(out), "--encoding", "latin-1"], capsys)
    assert code == 0 and read_csv(out)[0]["text"] == "first line une crêpe brûlée"  # never "cr\ufffdpe"

    sidecar.unlink()
    for name, content in (("captions.tsv", "a.mp4\tun caf\xe9\n"), ("captions.json", '{"a": "un caf\xe9"}')):
        captions = tmp_path / name
        captions.write_bytes(content.encode("latin-1"))
        code, _, err = run_cli(["csv", "--videos", str(folder), "--captions", str(captions), "--out", str(out)],
                               capsys)
        assert_one_line_error(code, err, f"{captions}:1: not valid utf-8")
        code, _, _ = run_cli(["csv", "--videos", str(folder), "--captions", str(captions), "--out", str(out),
                              "--encoding", "latin-1"], capsys)
        assert code == 0 and read_csv(out)[0]["text"] == "un café"
    json.loads((tmp_path / "captions.json").read_text(encoding="latin-1"))  # the file itself was valid JSON


# --------------------------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("header, line, expected", [
    ("text,path", "a cat,clips/a.mp4", {"text": "a cat"}),
    ("path,text,num_frames", "clips/a.mp4,a cat,16", {"text": "a cat", "num_frames": 16}),
    ("fps,Caption,VIDEO", "8,a cat,clips/a.mp4", {"text": "a cat", "fps": 8.0}),
])
def test_header_is_recognised_by_its_names_in_any_order(tmp_path, header, line, expected):
    path = tmp_path / "data.csv"
    path.write_text(f"{header}\n{line}\n")
    rows = read_csv(path)
    assert rows == [{"path": str(tmp_path / "clips/a.mp4"), **expected}]


@pytest.mark.parametrize("caption", ["Video", "text", "caption", "path"])
def test_headerless_row_whose_caption_is_a_column_name_is_data(tmp_path, caption):
    """A first row holding a media file name is a data row (read so before headers were recognised by name)."""
    path = tmp_path / "data.csv"
    path.write_text(f"clips/a.mp4,{caption}\nclips/b.jpg,a dog\n")
    assert [(r["path"], r["text"]) for r in read_csv(path)] == [(str(tmp_path / "clips/a.mp4"), caption),
                                                              (str(tmp_path / "clips/b.jpg"), "a dog")]


@pytest.mark.parametrize("header, message", [
    ("text,fps", "expected a 'path' (or 'video', 'filepath') and a 'text'"),
    ("path,label", "expected a 'path' (or 'video', 'filepath') and a 'text'"),
])
def test_header_missing_a_column_is_an_error(tmp_path, header, message):
    path = tmp_path / "data.csv"
    path.write_text(f"{header}\nclips/a.mp4,8\n")
    with pytest.raises(DataError, match="row 1: unknown header layout") as info:
        read_csv(path)
    assert message in str(info.value)


def test_training_dataset_reports_the_same_errors(tmp_path):
    """`opendit train` reads the CSV through VideoTextDataset: the same one-line errors (it prints DataError alone)."""
    from opendit.data.dataset import VideoTextDataset

    path = tmp_path / "latin1.csv"
    path.write_bytes("a.mp4,un caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:1: not valid utf-8"):
        VideoTextDataset(path)
    path.write_text("\n".join(rows_csv(20)[:3] + ['clips/x.mp4,"open'] + rows_csv(20)[3:]) + "\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:4: unclosed quote"):
        VideoTextDataset(path)
