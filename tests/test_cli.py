"""The command as a user meets it: help without torch, output modes, model errors, exit codes, man pages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, run_process
from .test_sources import one_error_line

HEAVY = ("torch", "transformers", "qwen_vl_utils", "PIL", "numpy")


@pytest.mark.parametrize("argv", [[], ["--help"], ["describe", "--help"], ["ask", "--help"], ["video", "--help"],
                                  ["batch", "--help"], ["serve", "--help"], ["ps", "--help"], ["stop", "--help"],
                                  ["--version"]])
def test_help_does_not_import_heavy_modules(argv):
    code = (
        "import sys\nsys.argv = ['qwen2vl', *%r]\nfrom qwen2vl_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in %r if m in sys.modules))" % (argv, HEAVY)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "LOADED []" in out.stdout, out.stdout[-500:] + out.stderr[-500:]


def test_help_lists_every_command():
    for command in ("describe", "ask"):
        out = run_process(command, "--help")
        assert out.returncode == 0 and b"--max-pixels" in out.stdout


def test_piped_output_is_plain_text_ending_in_newline(cli, images):
    result = cli("describe", images["a"], "-n", "12")
    assert result.exit_code == 0
    assert "\x1b[" not in result.stdout and result.stdout.endswith("\n")
    assert result.stderr == ""  # no spinner, no notes when piped


def test_json_output_fields(cli, images, tiny_model):
    result = cli("describe", images["a"], images["b"], "-p", "Compare them.", "-n", "8", "--json")
    record = json.loads(result.stdout)
    assert set(record) >= {"text", "sources", "prompt", "model", "usage", "timings"}
    assert record["sources"] == [str(images["a"]), str(images["b"])]
    assert record["prompt"] == "Compare them." and record["model"] == str(tiny_model)
    assert record["usage"]["completion_tokens"] == 8 and record["usage"]["prompt_tokens"] > 20
    assert set(record["timings"]) == {"load_s", "first_token_s", "total_s"}
    assert 0 < record["timings"]["first_token_s"] <= record["timings"]["total_s"]


def test_prompt_and_question_flags_are_one_option(cli, images):
    """describe's -p and ask's and video's -q each take the other's name too: a hand used to one is not refused."""
    asked = [json.loads(cli(command, images["a"], flag, "Which colour?", "-n", "6", "--json").stdout)
             for command in ("describe", "ask") for flag in ("-p", "-q", "--prompt", "--question")]
    assert all(record == asked[0] | {"timings": record["timings"]} for record in asked)
    assert asked[0]["prompt"] == "Which colour?"


def test_text_only_chat_and_system_message(cli):
    plain = cli("ask", "-q", "Who are you?", "-n", "8", "--json")
    system = cli("ask", "-q", "Who are you?", "-n", "8", "--json", "--system", "You are a pirate.")
    assert plain.exit_code == 0 and system.exit_code == 0
    assert json.loads(plain.stdout)["usage"]["prompt_tokens"] != json.loads(system.stdout)["usage"]["prompt_tokens"]


def test_greedy_is_deterministic_and_sampling_is_seeded(cli, images):
    runs = [cli("describe", images["a"], "-n", "12").stdout for _ in range(2)]
    assert runs[0] == runs[1]
    sampled = [cli("describe", images["a"], "-n", "12", "-t", "1.5", "--seed", str(s)).stdout for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_model_loads_once_per_process(cli, images, monkeypatch):
    from transformers import Qwen2VLForConditionalGeneration

    from qwen2vl_cli.engine import session as session_module

    monkeypatch.setattr(session_module, "_SESSIONS", {})
    calls = []
    original = Qwen2VLForConditionalGeneration.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "from_pretrained", classmethod(counting))
    for source in ("a", "b", "c"):
        assert cli("describe", images[source], "-n", "2").exit_code == 0
    assert len(calls) == 1


@pytest.mark.parametrize("args, status, reason", [
    (["describe"], 2, None),
    (["describe", "x.png", "--min-pixels", "lots"], 2, None),
    (["ask", "x.png"], 2, 'give the question with -q, e.g. -q "What is in this picture?"'),
    (["ask", "{a}", "What color is it?"], 2, "the question goes after -q: qwen2vl ask {a} -q 'What color is it?'"),
    (["describe", "{a}", "--resized-height", "100"], 2, "give both or neither"),
    (["describe", "{a}", "--min-pixels", "2000", "--max-pixels", "1000"], 2, "larger than --max-pixels"),
    (["describe", "{a}", "--max-pixels", "10"], 2, "below the least area of an image, 3136"),
    (["video", "clip.mp4", "--max-pixels", "50000"], 2, "below the least area of a video frame, 100352"),
    (["ask", "--video", "clip.mp4", "-q", "Why?", "--max-pixels", "2000"], 2, "least area of a video frame"),
    (["video", "clip.mp4", "--min-pixels", "2000", "--max-pixels", "1000"], 2, "larger than --max-pixels"),
    (["describe", "{a}", "--bogus"], 2, None),
    (["describe", "{a}", "--device", "gpu"], 2, "use auto, cpu, mps, cuda or cuda:N"),
    (["describe", "{a}", "--dtype", "fp8"], 2, "use one of auto"),
    (["describe", "{a}", "-t", "nan"], 2, None),  # click's ranges let nan through (options.finite)
    (["describe", "{a}", "--top-p", "nan"], 2, None),
    (["video", "clip.mp4", "--fps", "nan"], 2, None),  # was "cannot convert float NaN to integer", exit 3
    (["video", "clip.mp4", "--start", "nan"], 2, None),  # was an unexpected ValueError, exit 1
    (["video", "clip.mp4", "--min-frames", "10", "--max-frames", "4"], 2, "--min-frames 10: above --max-frames 4"),
    (["describe", "{a}", "--max-download", "0"], 2, None),  # a cap of nothing: every input refused
    (["serve", "--max-body-size", "0"], 2, None),  # was served, every request a 413
    (["describe", "{a}", "-p", "caf\udce9"], 2, None),  # Latin-1 bytes typed into a UTF-8 terminal: was exit 1
    (["ask", "-q", "Hi", "-s", "\udcff"], 2, None),
    (["serve", "--served-model-name", " "], 2, "--served-model-name: empty: clients name the model by it"),
    (["describe", "{a}", "--repetition-penalty", "0"], 2, "must be above 0 (1.0 is no penalty)"),
    (["describe", "{a}", "-t", "3"], 2, None),  # a session's API (OpenAI's range) would refuse it: refused alike
    (["describe", "{a}", "--seed", "-1"], 2, None),
])
def test_usage_errors_exit_2(cli, images, args, status, reason):
    result = cli(*[a.format(a=images["a"]) for a in args])
    assert result.exit_code == status, result.stderr
    assert "Traceback" not in result.stderr
    if reason:
        one_error_line(result, reason.format(a=images["a"]))


def test_stop_texts_read_escapes_and_are_checked(cli, images):
    """--stop '\\n' is a newline (a shell passes two characters); an empty text or more than the API's 16 are usage
    errors, one line, exit 2, before any model loads."""
    from qwen2vl_cli.cli.options import stop_texts

    assert stop_texts(["\\n", "a\\tb", "\\\\n", "plain"]) == ["\n", "a\tb", "\\n", "plain"]
    assert stop_texts(None) == []
    empty = cli("describe", images["a"], "--stop", "", "--model", "/nonexistent")
    assert empty.exit_code == 2
    one_error_line(empty, "--stop: empty: give the text the answer is to end before")
    many = cli("ask", "-q", "Hi", *[arg for i in range(17) for arg in ("--stop", f"s{i}")])
    assert many.exit_code == 2
    one_error_line(many, "--stop: given 17 times; at most 16")


@pytest.mark.parametrize("args, said", [
    (["describe", "{a}", "What is in it?"], "What is in it?: no such file (text for the model goes after -p)"),
    (["ask", "{a}", "Why red?", "-q", "Hi"], "Why red?: no such file (text for the model goes after -q)"),
    (["describe", "{a}", "missing.jpg"], "missing.jpg: no such file"),
])
def test_a_prompt_typed_as_a_source_is_pointed_to_its_option(cli, images, args, said):
    """A missing SOURCE that reads as prose says where text goes; a missing file name is only missing (exit 3 both)."""
    result = cli(*[a.format(a=images["a"]) for a in args])
    assert result.exit_code == 3, result.stderr
    one_error_line(result, said)
    assert result.stderr.strip().endswith(said)


@pytest.mark.parametrize("command", [["describe"], ["video"], ["ask", "-q", "Hi", "--video"], ["batch"]])
def test_an_empty_source_is_said_to_be_empty(cli, command):
    """"$PHOTO" unset: an empty SOURCE was the current directory ("is a directory"; a video's frames or a batch run
    over it, sidecars and all); now one line, exit 3."""
    result = cli(*command, "", "-n", "2")
    assert result.exit_code == 3, result.stderr
    one_error_line(result, "'': an empty source (an unset variable?): give a path, a URL, a data URI or - for stdin")


def test_model_errors_exit_4(cli, images, tmp_path):
    missing = cli("describe", images["a"], "--model", str(tmp_path / "nope"), model=False)
    assert missing.exit_code == 4
    one_error_line(missing, "nope", "no such model directory")

    (tmp_path / "empty").mkdir()
    empty = cli("describe", images["a"], "--model", str(tmp_path / "empty"), model=False)
    assert empty.exit_code == 4
    one_error_line(empty, "no config.json")

    offline = cli("describe", images["a"], "--model", "Qwen/Qwen2-VL-2B-Instruct", model=False)
    assert offline.exit_code == 4
    one_error_line(offline, "not in the Hugging Face cache", "hf download Qwen/Qwen2-VL-2B-Instruct")

    no_gpu = cli("describe", images["a"], "--device", "cuda:3")
    assert no_gpu.exit_code == 4
    one_error_line(no_gpu)


def test_qwen2vl_model_environment_variable(images, tiny_model):
    out = run_process("describe", images["a"], "-n", "4", env={"QWEN2VL_MODEL": str(tiny_model)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith(b"\n") and len(out.stdout) > 1


def test_debug_shows_the_traceback(images):
    quiet = run_process("describe", "/no/such/file.png")
    debug = run_process("describe", "/no/such/file.png", env={"QWEN2VL_DEBUG": "1"})
    assert quiet.returncode == debug.returncode == 3
    assert b"Traceback" not in quiet.stderr and b"Traceback" in debug.stderr


def test_ctrl_c_exits_130_without_traceback(images, tiny_model):
    env = {**os.environ, "QWEN2VL_MODEL": str(tiny_model), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen2vl_cli", "describe", str(images["a"]), "-n", "30000",
         "--repetition-penalty", "1.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    first = process.stdout.read(1)  # generation has started
    assert first
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert b"Traceback" not in stderr and stderr.strip().endswith(b"interrupted")


def test_man_pages_are_current():
    from qwen2vl_cli.cli.manpage import render_pages

    pages = render_pages()
    for name, text in pages.items():
        on_disk = ROOT / "man" / name
        assert on_disk.exists(), f"{name} missing: run python -m qwen2vl_cli.cli.manpage man"
        assert on_disk.read_text() == text, f"{name} is stale: run python -m qwen2vl_cli.cli.manpage man"
    assert sorted(p.name for p in (ROOT / "man").glob("*.1")) == sorted(pages)


def test_size_defaults_read_as_written_are_the_library_s_numbers():
    """--max-download and --total-pixels show their defaults as a person writes them (100MB, 2GB, 24576*28*28), and
    those parse to the numbers the code's own defaults are (a default's text is what a command receives)."""
    import typer.main

    from qwen2vl_cli.cli import app
    from qwen2vl_cli.sources import DEFAULT_MAX_DOWNLOAD
    from qwen2vl_cli.video import DEFAULT_TOTAL_PIXELS, DEFAULT_VIDEO_MAX_DOWNLOAD

    group = typer.main.get_command(app)
    expected = {("describe", "max_download"): DEFAULT_MAX_DOWNLOAD, ("ask", "max_download"): DEFAULT_MAX_DOWNLOAD,
                ("batch", "max_download"): DEFAULT_MAX_DOWNLOAD, ("serve", "max_download"): DEFAULT_MAX_DOWNLOAD,
                ("video", "max_download"): DEFAULT_VIDEO_MAX_DOWNLOAD, ("video", "total_pixels"): DEFAULT_TOTAL_PIXELS}
    for (name, option), number in expected.items():
        command = group.commands[name]
        param = next(p for p in command.params if p.name == option)
        with command.make_context(name, [], resilient_parsing=True) as ctx:
            shown = param.get_default(ctx)
            assert isinstance(shown, str) and not shown.isdigit(), (name, option, shown)
            assert param.type_cast_value(ctx, shown) == number, (name, option, shown)


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_man_pages_render_without_warnings():
    for page in sorted((ROOT / "man").glob("*.1")):
        out = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                             env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"})
        assert out.returncode == 0 and out.stderr == "", f"{page.name}: {out.stderr}"
        assert "EXIT STATUS" in out.stdout


def test_verbose_says_where_loading_went(cli, images):
    """--verbose names the weights, the path that answers, and the load's phases (imports, weights)."""
    import re

    result = cli("describe", images["a"], "-n", "2", "-v")
    assert result.exit_code == 0, result.stderr
    # (torch is imported already in this process: a phase under 0.05 s is not named)
    found = re.search(r"float32 weights on cpu; fast path off \(CPU\); loaded in [0-9.]+s \(([^)]+)\)", result.stderr)
    assert found, result.stderr
    phases = dict(part.rsplit(" ", 1) for part in found.group(1).split(", "))
    assert set(phases) <= {"checks", "imports", "processor", "weights", "fast path check"}, phases
    assert all(re.fullmatch(r"[0-9]+\.[0-9]s", seconds) for seconds in phases.values()), phases


def test_the_process_ends_without_the_interpreters_teardown(tiny_model, images):
    """main() ends the process once its exit handlers have run, skipping the teardown of every module torch and
    transformers made (0.2-0.4 s of an in-process one-liner): an object that would be freed in that teardown
    never is, the answer is on stdout whole, and the exit status is the command's."""
    code = ("import sys\n"
            "class Teardown:\n    def __del__(self):\n        print('TEARDOWN', file=sys.stderr)\n"
            "seen = Teardown()\n"
            f"sys.argv = ['qwen2vl', 'describe', {str(images['a'])!r}, '--model', {str(tiny_model)!r}, '-n', '6',"
            " '--no-server', '--json']\n"
            "from qwen2vl_cli.cli import main\nmain()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0 and json.loads(done.stdout)["text"], done.stdout + done.stderr
    assert "TEARDOWN" not in done.stderr, done.stderr
    missing = subprocess.run([sys.executable, "-c", code.replace(str(images["a"]), "/no/such/photo.png")],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert missing.returncode == 3 and missing.stderr == "qwen2vl: error: /no/such/photo.png: no such file\n"
    control = subprocess.run([sys.executable, "-c", code.replace("from qwen2vl_cli.cli import main\nmain()\n", "")],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "TEARDOWN" in control.stderr  # the object is one a usual teardown frees


def test_main_called_by_another_program_leaves_its_exit_alone(tmp_path):
    """Where main() is called by a test runner or another program (not as the program itself), that program's own
    exit and status stand: no prompt end with main()'s status at its exit."""
    (tmp_path / "caller.py").write_text("import sys\nfrom qwen2vl_cli.cli import main\n\n\ndef call():\n"
                                         "    sys.argv = ['qwen2vl', '--version']\n    try:\n        main()\n"
                                         "    except SystemExit as exc:\n        return exc.code\n")
    code = (f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport caller\n"
            "print('main said', caller.call())\nsys.exit(5)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 5 and "main said 0" in done.stdout, done.stdout + done.stderr


def test_control_characters_never_reach_the_terminal(cli, tmp_path):
    """A file name or a model's answer holding escape sequences (clear the screen, retitle the window, write the
    clipboard) is shown with them escaped: the error stays one line, the rendered answer holds no injected ESC."""
    import io

    from qwen2vl_cli.render import Environment, OutputOptions, render_answer
    from qwen2vl_cli.types import Completion, TextDelta

    hostile = tmp_path / "\x1b[2Jcleared\nsecond line\x9b.png"
    hostile.write_bytes(b"")
    result = cli("describe", hostile)
    one_error_line(result, "\\x1b[2Jcleared\\nsecond line\\x9b.png", "empty file")
    assert "\x1b" not in result.stderr and "\x9b" not in result.stderr

    answer = "A cat.\x1b]52;c;cm0gLXJmIH4=\x07 \x1b[8mhidden\x1b[0m"
    for stream in (True, False):
        out = io.StringIO()
        env = Environment(out, io.StringIO(), stdout_isatty=True, stderr_isatty=False)
        render_answer(iter([TextDelta(answer), Completion(answer, 1, 1, "stop", 0.1, 0.2)]), env,
                      OutputOptions(stream=stream), {})
        shown = out.getvalue()
        assert "A cat." in shown and "\\x1b]52;c;cm0gLXJmIH4=" in shown
        assert "\x1b]52" not in shown and "\x1b[8m" not in shown and "\x07" not in shown
    piped = io.StringIO()  # piped, the answer is data: every character as the model gave it
    render_answer(iter([TextDelta(answer), Completion(answer, 1, 1, "stop", 0.1, 0.2)]),
                  Environment(piped, io.StringIO(), stdout_isatty=False, stderr_isatty=False), OutputOptions(), {})
    assert piped.getvalue() == answer + "\n"


def test_a_process_builds_only_the_command_it_runs_and_answers_as_the_whole_app():
    """`qwen2vl CMD ...` builds CMD alone (typer reads every registered command's signature first: ~30-60 ms of each
    one-liner); its help, usage errors and exit codes are the whole app's, word for word. Anything else (no command,
    a misspelt one, the root's options first, shell completion) goes to the whole app."""
    import typer.main
    from typer.testing import CliRunner

    from qwen2vl_cli.cli import COMMANDS, app, invoked, make_app

    assert [c.name for c in typer.main.get_command(make_app("ask")).commands.values()] == ["ask"]
    runner = CliRunner()
    for name in COMMANDS:
        for words in ([name, "--help"], [name, "--no-such-option"], [name, "-n", "0", "x.png"]):
            whole, alone = (runner.invoke(made, words, prog_name="qwen2vl", env={"COLUMNS": "100"})
                            for made in (app, make_app(name)))
            assert (alone.exit_code, alone.output) == (whole.exit_code, whole.output), words
    assert invoked(["describe", "x.png"]) == "describe" and invoked(["stop"]) == "stop"
    assert invoked([]) is invoked(["--version"]) is invoked(["-h", "ask"]) is invoked(["describ", "x"]) is None
    done = run_process("ask", "--help")
    assert done.returncode == 0 and b"Ask a question about images and videos" in done.stdout
