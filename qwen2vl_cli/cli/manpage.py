"""Man pages generated from the same click definitions as --help: `python -m qwen2vl_cli.cli.manpage man/`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .. import __version__
from ..errors import EXIT_STATUS_MEANINGS

ENVIRONMENT = {
    "QWEN2VL_MODEL": "Model used when --model is not given.",
    "QWEN2VL_SERVER": "An OpenAI-compatible server to send the work to (as --server).",
    "QWEN2VL_API_KEY": "Bearer token for a server (as --api-key).",
    "QWEN2VL_STATE_DIR": "Where running sessions and passed fast-path checks are recorded (default: "
                         "$XDG_RUNTIME_DIR/qwen2vl).",
    "QWEN2VL_DEBUG": "Set to 1 to print the traceback of an error.",
    "QWEN2VL_FASTPATH": "auto (default: the GPU fast path for greedy answers on CUDA), off, or on.",
    "HF_HOME": "Where the Hugging Face cache lives (models are loaded from it first).",
    "HF_HUB_OFFLINE": "Set to 1 to never contact the Hugging Face hub.",
}


def roff(text: str) -> str:
    """Escape text for roff: backslashes, hyphens, and lines starting with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.splitlines())


def _option_line(param) -> str:
    names = ", ".join(f"\\fB{roff(n)}\\fR" for n in [*param.opts, *param.secondary_opts])
    if getattr(param, "is_flag", False):
        return names
    return f"{names} \\fI{roff(_metavar(param))}\\fR"


def _metavar(param) -> str:
    if param.metavar:
        return param.metavar
    descriptor = getattr(param, "type_descriptor", None)  # typer >= 0.29; before it, the click type says
    annotation = descriptor.annotation if descriptor is not None else _CLICK_TYPES.get(param.type.name, object)
    names = {int: "INTEGER", float: "NUMBER", str: "TEXT"}
    return next((v for k, v in names.items() if k == annotation or k in getattr(annotation, "__args__", ())),
                "VALUE")


_CLICK_TYPES = {"int": int, "int range": int, "float": float, "float range": float, "str": str}


def _default(param) -> str:
    if param.required:
        return " (required)"
    if getattr(param, "is_flag", False) or param.default in (None, (), []) or not param.show_default:
        return ""
    return f" (default: {param.default})"


def command_page(name: str, command, parent: str = "qwen2vl") -> str:
    """The roff source of one command's page."""
    full = f"{parent} {name}"
    help_text = (command.help or "").strip()
    summary, _, rest = help_text.partition("\n")
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    options = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
    synopsis = " ".join(f"[\\fI{roff(a.metavar or a.name.upper())}\\fR]..." if not a.required
                        else f"\\fI{roff(a.metavar or a.name.upper())}\\fR..." for a in arguments)
    out = [
        f'.TH "{roff(full.upper().replace(" ", "-"))}" 1 "" "qwen2vl {__version__}" "User Commands"',
        ".SH NAME", f"{roff(full.replace(' ', '-'))} \\- {roff(summary.rstrip('.'))}",
        ".SH SYNOPSIS", f".B {full}", f"[\\fIOPTIONS\\fR] {synopsis}".rstrip(),
    ]
    if rest.strip():
        out.append(".SH DESCRIPTION")
        for index, paragraph in enumerate(p for p in rest.strip().split("\n\n") if p.strip()):
            lines = paragraph.splitlines()
            out += [".PP"] if index else []
            if any(line.startswith(" ") for line in lines):  # laid out by hand (a table): kept as it is
                out += [".nf", *(roff(line) for line in lines), ".fi"]
            else:
                out.append(roff(" ".join(paragraph.split())))
    if arguments:
        out.append(".SH ARGUMENTS")
        for arg in arguments:
            out += [".TP", f"\\fI{roff(arg.metavar or arg.name.upper())}\\fR", roff(getattr(arg, "help", "") or "")]
    panels: dict[str, list] = {}
    for option in options:
        panels.setdefault(getattr(option, "rich_help_panel", None) or "Options", []).append(option)
    out.append(".SH OPTIONS")
    for panel, members in panels.items():
        if panel != "Options":
            out.append(f".SS {roff(panel)}")
        for option in members:
            out += [".TP", _option_line(option), roff((option.help or "") + _default(option))]
    out += [".SH EXIT STATUS", *exit_status_lines(), ".SH SEE ALSO", "\\fBqwen2vl\\fR(1)"]
    return "\n".join(out) + "\n"


def exit_status_lines() -> list[str]:
    lines = []
    for status, meaning in EXIT_STATUS_MEANINGS.items():
        lines += [".TP", f"\\fB{int(status)}\\fR", roff(meaning)]
    return lines


def main_page(group) -> str:
    """The roff source of qwen2vl(1): commands, exit status, environment."""
    out = [
        f'.TH "QWEN2VL" 1 "" "qwen2vl {__version__}" "User Commands"',
        ".SH NAME", "qwen2vl \\- " + roff((group.help or "").strip().splitlines()[0].rstrip(".")),
        ".SH SYNOPSIS", ".B qwen2vl", "\\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGS\\fR]...",
        ".SH COMMANDS",
    ]
    for name, command in group.commands.items():
        summary = (command.help or "").strip().splitlines()[0]
        out += [".TP", f"\\fBqwen2vl\\-{roff(name)}\\fR(1)", roff(summary)]
    out += [".SH EXIT STATUS", *exit_status_lines(), ".SH ENVIRONMENT"]
    for name, meaning in ENVIRONMENT.items():
        out += [".TP", f"\\fB{roff(name)}\\fR", roff(meaning)]
    out += [".SH EXAMPLES", ".nf", roff("qwen2vl describe photo.jpg"),
            roff('qwen2vl ask a.jpg b.jpg -q "What differs?"'),
            roff("curl -s https://example.com/cat.png | qwen2vl describe -"), ".fi"]
    return "\n".join(out) + "\n"


def render_pages() -> dict[str, str]:
    """Every page: file name -> roff source."""
    from . import app

    group = typer.main.get_command(app)
    pages = {"qwen2vl.1": main_page(group)}
    for name, command in group.commands.items():
        pages[f"qwen2vl-{name}.1"] = command_page(name, command)
    return pages


def write_pages(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_pages().items():
        (directory / name).write_text(text)
        written.append(directory / name)
    return written


if __name__ == "__main__":
    for path in write_pages(Path(sys.argv[1] if len(sys.argv) > 1 else "man")):
        print(path)
