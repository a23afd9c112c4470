"""What the launch/ scripts share: flag parsing that fails in one line naming the bad flag."""
import sys

from absl import flags


def fail(message, code=2):
  """Prints `error: message` to stderr and exits with `code`."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv, required):
  """Parses the absl flags of `argv`.

  ml_collections raises a bare AttributeError / KeyError (naming only the last
  path component) for an unknown --config.a.b: it becomes one line naming the
  whole flag. `required`: {flag name: example value} of flags that must be
  given.
  """
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  except (AttributeError, KeyError) as e:
    name = str(e).strip("\"'")
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.")
           and name in a.split("=")[0].split(".")]
    key = bad[0][2:] if bad else name
    fail(f"unknown config key {key!r}: not in the config file (see configs/clus_base.py "
         "for the keys).")
  except (TypeError, ValueError) as e:
    fail(f"{type(e).__name__}: {e}")
  for name, example in required.items():
    if flags.FLAGS[name].value is None:
      fail(f"--{name} is required, e.g. --{name}={example}")
