"""What the launch/ scripts share: flag parsing that fails in one line naming the bad
flag, config file, variant or key (exit 2), never with a traceback."""
import difflib
import importlib.machinery
import importlib.util
import os
import re
import sys

from absl import flags
from ml_collections.config_flags import config_flags

# One part of a --config.a.b override: a key name, maybe with [i] indices.
_PART = re.compile(r"([A-Za-z_]\w*)((?:\[[^\]]*\])*)")
_NUMBER = re.compile(r"-?(\d|\.\d)")
_LOADED = {}   # (file, mtime, variant) -> its config, for the key checks only


def fail(message, code=2):
  """Prints `error: message` to stderr and exits with `code`."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _one_line(error):
  """The first non-empty line of an exception's message (absl and ml_collections wrap
  some errors with a traceback's text)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def load_config_file(spec, flag="config"):
  """`path[:variant]` -> what the file's get_config(variant) returns; a missing file, a
  file that does not load and an unknown variant fail in one line naming them."""
  path, colon, variant = spec.partition(":")
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    try:
      known = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    except OSError:   # no such folder, or not ours to read
      known = []
    fail(f"--{flag}={spec}: no such file {path!r}"
         + (f"; {folder} has {', '.join(known)}." if known else "; give path[:variant], e.g. "
            "configs/clus_base.py:tiny."))
  try:
    loader = importlib.machinery.SourceFileLoader("_clusjax_checked_config", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    if not hasattr(module, "get_config"):
      fail(f"--{flag}={spec}: {path} has no get_config(arg=None); it is not a config file.")
    return module.get_config(*([variant] if colon else []))
  except Exception as e:  # any error of the user's file: one line, no traceback
    message = _one_line(e)   # get_config's own errors start with the file (configs/*.py)
    fail(message if message.startswith(path) else
         f"--{flag}={spec}: {type(e).__name__}: {message}")


def _what(value):
  return {bool: "True or False", int: "an integer", float: "a number", str: "a string",
          tuple: "a tuple", list: "a list"}.get(type(value), type(value).__name__)


def _resolve(config, path, arg, flag):
  """The value at dotted `path` of `config` (the override `arg`), or one line naming what
  of it is not there: an unknown key at any depth, a key under a value, index syntax."""
  node, where = config, flag
  for part in path.split("."):
    match = _PART.fullmatch(part)
    if not match:
      fail(f"flag {arg}: {part!r} is not a key name; write --{flag}.<section>.<key>=<value>, "
           "e.g. --config.train.batch_size=64.")
    name, index = match.groups()
    if not hasattr(node, "keys"):
      fail(f"flag {arg}: {where}={node!r} is {_what(node)}, not a section: it has no key "
           f"{name!r}; write --{where}=<value>.")
    if name not in node:
      key, keys = f"{where}.{name}", sorted(node.keys())
      close = difflib.get_close_matches(name, keys, n=1)
      hint = (f"did you mean {where}.{close[0]}?" if close
              else f"{where} has {', '.join(keys)}.")
      fail(f"unknown config key {key!r} (flag {arg}): not in the config file; {hint}")
    node, where = node[name], f"{where}.{name}"
    if index:
      whole = (f'set it whole, e.g. --{where}="{node!r}"' if isinstance(node, (tuple, list))
               else f"write --{where}=<value>" if not hasattr(node, "keys")
               else f"write --{where}.<key>=<value>")
      shown = "a section" if hasattr(node, "keys") else f"{node!r}, {_what(node)}"
      fail(f"flag {arg}: {where} is {shown}; index syntax {index} cannot set part of a value: "
           f"{whole}.")
  return node


def check_config_overrides(argv, flag="config"):
  """Before absl parses `argv`: the --config file loads, and each --config.a.b names a key
  of it with a value. ml_collections would raise a bare IOError / IndexError / KeyError
  (with a traceback), or take the next flag as the value."""
  args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  spec = None
  for i, arg in enumerate(args):
    match = re.fullmatch(rf"--?{flag}(=(.*))?", arg)
    if match:
      spec = match.group(2) if match.group(1) else (args[i + 1] if i + 1 < len(args) else "")
  if spec is None:
    return   # the required-flag check names it
  if not spec:
    fail(f"--{flag} is empty; give path[:variant], e.g. --{flag}=configs/clus_base.py:tiny.")
  path, _, variant = spec.partition(":")
  stamp = (os.path.realpath(path), os.stat(path).st_mtime_ns if os.path.isfile(path) else 0,
           spec.count(":"), variant)
  if stamp not in _LOADED:   # read only here: one load per file and variant per process
    _LOADED[stamp] = load_config_file(spec, flag)
  config = _LOADED[stamp]
  for i, arg in enumerate(args):
    match = re.fullmatch(rf"--?(no)?{flag}\.([^=]*)(=.*)?", arg, re.DOTALL)
    if not match:
      continue
    negated, path, value = match.groups()
    if not path:
      fail(f"flag {arg}: no key after '{flag}.'; write --{flag}.<key>=<value>, e.g. "
           "--config.train.batch_size=64.")
    node = _resolve(config, path, arg, flag)
    if negated and not isinstance(node, bool):
      fail(f"flag {arg}: --no{flag}.<key> sets a True/False key to False; {flag}.{path} is "
           f"{_what(node)}: write --{flag}.{path}=<value>.")
    following = args[i + 1] if i + 1 < len(args) else None
    if value is None and not isinstance(node, bool) and (
        following is None or (following.startswith("-") and not _NUMBER.match(following))):
      fail(f"flag {arg} has no value; write --{flag}.{path}=<value> (now {node!r}).")


def parse_flags(argv, required, flag_values=flags.FLAGS):
  """Parses the absl flags of `argv` into `flag_values`.

  A config file that is missing or does not load, an unknown variant, an unknown
  --config.a.b at any depth, index syntax and a flag without its value fail in one line
  naming the file / variant / flag (check_config_overrides); so does any value absl or
  ml_collections cannot parse. `required`: {flag name: example value} of flags that
  must be given.
  """
  for name in list(flag_values):   # the config-file flags (DEFINE_config_file)
    if isinstance(flag_values[name].parser, config_flags.ConfigFileFlagParser):
      check_config_overrides(argv, name)
  try:
    flag_values(argv)
  except flags.Error as e:
    fail(_one_line(e))
  except Exception as e:  # ml_collections' own (TypeError, ValueError, ...) for a --config.*
    bad = [a for a in argv[1:] if a.lstrip("-").split(".")[0] in ("config", "noconfig")]
    fail(f"flag {bad[-1] if bad else ' '.join(argv[1:])}: {type(e).__name__}: {_one_line(e)}")
  for name, example in required.items():
    if flag_values[name].value in (None, ""):
      fail(f"--{name} is required, e.g. --{name}={example}")
