"""Command-line parsing for the frozen config dataclasses of train.py and rollout.py
(tspo_jax/config.py's ``Config``, rollout.py's ``EvalConfig``).

A field is declared with ``option(default, "one-line help")``; a field whose type is itself such a
dataclass contributes its fields at the top level (``--max-turns``, not ``--agent.max-turns``),
so one flat command line fills a nested config (field names are unique across the nesting).
A nested field's default instance is honoured: ``agent: RolloutConfig = RolloutConfig(greedy=
True)`` makes ``--greedy`` default to true, in the help and in the parsed config.
Validation stays in each dataclass's ``__post_init__``, whose ValueError is reported as a usage
error naming the option.
"""

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import sys
import types
import typing
from pathlib import Path

from tqdm import tqdm

from tspo_jax.retrieval import RetrievalError


def option(default, help, *, choices=None, resumable=False):
    """A config field with its default, its one-line help and, optionally, its allowed values
    and whether it may change when a run is resumed (``resumable_options``)."""
    metadata = {"help": help, "choices": choices, "resumable": resumable}
    return dataclasses.field(default=default, metadata=metadata)


def resumable_options(cls) -> set[str]:
    """The options of ``cls`` (its nested configs' included) declared ``resumable``."""
    hints, names = typing.get_type_hints(cls), set()
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            names |= resumable_options(hints[f.name])
        elif f.metadata.get("resumable"):
            names.add(f.name)
    return names


def _flag(name):
    return "--" + name.replace("_", "-")


def _is_config(tp):
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _scalar_type(tp):
    """The type argparse converts a value to: int, float, str, bool, or the element of a tuple."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return _scalar_type(next(a for a in typing.get_args(tp) if a is not type(None)))
    if typing.get_origin(tp) is tuple:
        return _scalar_type(typing.get_args(tp)[0])
    return tp


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _nested_default(f, base):
    """The default instance of a nested config field (from ``base``, the enclosing config's
    default instance, when there is one), or None: its class's defaults."""
    if base is not None:
        return getattr(base, f.name)
    return None if f.default is dataclasses.MISSING else f.default


def _add_fields(parser, cls, base=None):
    """Options for the fields of ``cls``; defaults shown are those of the instance ``base``
    when given (a nested field's default instance), else the class's."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_config(tp):
            _add_fields(parser, tp, _nested_default(f, base))
            continue
        scalar = _scalar_type(tp)
        default = f.default if base is None else getattr(base, f.name)
        kwargs = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{f.metadata.get('help', '')} (default: {default!r})",
        }
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if typing.get_origin(tp) is tuple:
            kwargs["nargs"] = "+"
        if scalar is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs["type"] = scalar
        parser.add_argument(_flag(f.name), **kwargs)


def _build(cls, values, base=None):
    """``cls`` from the values given, the rest from ``base`` (an instance) or the defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, _nested_default(f, base))
        elif f.name in values:
            value = values[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)


def parse(cls, argv=None, *, defaults=None):
    """Parse a command line into the frozen config dataclass ``cls``.

    ``defaults``: an optional function from the options given on the command line (a dict by
    field name) to other defaults for the options not given (a preset).
    """
    parser = argparse.ArgumentParser(description=cls.__doc__)
    _add_fields(parser, cls)
    given = vars(parser.parse_args(argv))
    values = {**(defaults(given) if defaults else {}), **given}
    try:
        return _build(cls, values)
    except ValueError as e:
        parser.error(str(e))


def to_dict(config):
    """A config as a JSON-ready dict (nested configs stay nested)."""
    return dataclasses.asdict(config)


def flatten(d: dict) -> dict:
    """A config dict with nested configs' fields lifted to the top (as on the command line)."""
    flat = {}
    for k, v in d.items():
        flat.update(flatten(v) if isinstance(v, dict) else {k: v})
    return flat


def describe(config):
    """The config in full, one option a line, for the top of a run's log."""
    flat = flatten(to_dict(config))
    width = max(len(k) for k in flat)
    return "\n".join(f"  {k:<{width}} {json.dumps(v)}" for k, v in flat.items())


# Errors that name a bad input (a missing folder, an empty file, a server that is down, a loss
# that stayed non-finite): a command line shows their message, not a traceback.
INPUT_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    ConnectionError,
    FloatingPointError,
    RetrievalError,
)


def run(main, argv=None):
    """Runs a command's ``main``: an input error prints ``<prog>: error: <message>`` (and its
    notes, e.g. how to resume, after "; ") and exits with status 2 (set TSPO_JAX_TRACEBACK=1 to
    see the traceback). A command run where libtpu is installed but no accelerator is present
    runs on the CPU (``leave_out_absent_tpu``)."""
    leave_out_absent_tpu()
    try:
        return main(argv)
    except INPUT_ERRORS as e:
        if os.environ.get("TSPO_JAX_TRACEBACK"):
            raise
        for bar in list(tqdm._instances):  # a progress bar left open: the error's line is its own
            bar.close()
        message = "; ".join([str(e), *getattr(e, "__notes__", ())])
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def leave_out_absent_tpu() -> None:
    """Where libtpu is installed (jax[tpu], which is also how train.py --plan-target compiles for
    TPU chips on any host) but no TPU chip or GPU is present, JAX would still load libtpu at
    start-up: seconds of probing, a screen of warnings, and a lock (/tmp/libtpu_lockfile) that
    keeps other processes from compiling for a TPU topology. Unless JAX_PLATFORMS says
    otherwise, the CPU is then the only backend."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if tpu_chips_present() or glob.glob("/dev/nvidia[0-9]*"):
        return
    import jax

    jax.config.update("jax_platforms", "cpu")


def tpu_chips_present() -> bool:
    """Whether this host has TPU chips: PCI devices of Google's (vendor 0x1ae0), as JAX itself
    looks for them."""
    vendors = [Path(p).read_text().strip() for p in glob.glob("/sys/bus/pci/devices/*/vendor")]
    return "0x1ae0" in vendors
