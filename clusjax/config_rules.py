"""The rule kinds that `clusjax.config.validate` reads its table with.

A rule is one line, `(key, kind, constraint)` or `(key, kind, constraint, when)`:

    ("optim.learning_rate", FLOAT, POSITIVE),
    ("loss.itc.label_smoothing", FLOAT, POSITIVE, its("loss.itc.kind", "label_smooth")),

kind: the type the value must have (INT, FLOAT, BOOL, STR, STRS); constraint: None or a
callable (value, config) -> None when it holds, else the end of the sentence
"config.<key>=<value> ..." (`Range`, `OneOf`, `NON_EMPTY`, or a function); when: a
callable config -> bool, the rule is read only when it is true (the settings of a loss
kind only while that kind is on). Whatever the table says, `check_numbers` holds every
number in the config to what its arrays can hold: floats finite and not 0 by underflow
in float32 (NaN, inf, 1e300 and 1e-300 are refused wherever they are), ints in int32.

Imports nothing of clusjax and no jax: `launch/main.py` refuses a bad flag in milliseconds.
"""
import dataclasses
import math
import os

# The largest finite float32 and int32: every float key ends up in a float32 computation,
# every int key in an int32 (a step counter, an array dimension, a seed).
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38   # the smallest normal float32
INT32_MAX = 2**31 - 1


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def set_key(config, key, value):
  """Sets the dotted `key` ("loss.itc.kind") of `config` to `value`, in place."""
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def lookup(config, key, default=None):
  """config's dotted `key`, or `default` where a part of it is missing."""
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return default
    node = node[part]
  return node


def get(config, key):
  """config's dotted `key`; ConfigError naming it when it is missing."""
  missing = object()
  value = lookup(config, key, missing)
  if value is missing:
    raise ConfigError(f"config.{key} is missing.")
  return value


@dataclasses.dataclass(frozen=True)
class Kind:
  types: tuple
  what: str
  item: type = None     # a tuple's: the type of each element ...
  item_what: str = ""   # ... and its name

  def check(self, key, value):
    # bool is an int subclass; `=True` on an int key is a mistake.
    if (isinstance(value, bool) and bool not in self.types) or not isinstance(value, self.types):
      raise ConfigError(f"config.{key}={value!r} must be {self.what}.")
    for i, item in enumerate(value if self.item else ()):
      if isinstance(item, bool) or not isinstance(item, self.item):
        raise ConfigError(f"config.{key}[{i}]={item!r} must be {self.item_what}.")


INT = Kind((int,), "an integer")
FLOAT = Kind((int, float), "a number")
BOOL = Kind((bool,), "True or False")
STR = Kind((str,), "a string")
STRS = Kind((tuple, list), "a tuple of strings", str, "a string")


@dataclasses.dataclass(frozen=True)
class Range:
  """low <= value <= high (< where open); None = unbounded."""
  low: float = None
  high: float = None
  low_open: bool = False
  high_open: bool = False

  def __call__(self, value, config):
    def show(bound):   # 0 for an int key, 0.0 for a float one
      return float(bound) if isinstance(value, float) else bound
    if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
      return f"must be {'>' if self.low_open else '>='} {show(self.low)}."
    if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
      return f"must be {'<' if self.high_open else '<='} {show(self.high)}."
    return None


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)               # a fraction, a probability, a beta of Adam


@dataclasses.dataclass(frozen=True)
class OneOf:
  choices: tuple

  def __call__(self, value, config):
    return None if value in self.choices else f"must be one of {', '.join(map(str, self.choices))}."


def NON_EMPTY(value, config):  # noqa: N802 (a constant of the table)
  return None if value else "must not be empty."


def EXISTING_PATH(value, config):  # noqa: N802
  """"" (off) or a path that exists: a missing one is found now, not after data generation."""
  if not value or os.path.exists(value):
    return None
  return 'does not exist: give an existing path, or "" for none.'


def its(key, *values):
  """when: config's `key` is one of `values`."""
  return lambda config: lookup(config, key) in values


def has(key):
  """when: config has `key` (a section a workdir from before it lacks)."""
  return lambda config: lookup(config, key) is not None


def is_on(key):
  """when: config's `key` is set (True, non-zero, non-empty)."""
  return lambda config: bool(lookup(config, key))


def check_rules(config, rules):
  """Raises ConfigError naming the key of the first rule `config` breaks."""
  for rule in rules:
    key, kind, constraint, when = (*rule, None, None)[:4]
    if when is not None and not when(config):
      continue
    value = get(config, key)
    kind.check(key, value)
    problem = constraint(value, config) if constraint is not None else None
    if problem:   # "must be ..." or ": the data source has ..."
      raise ConfigError(f"config.{key}={value!r}{'' if problem[0] == ':' else ' '}{problem}")


def check_numbers(node, prefix="config"):
  """Raises ConfigError naming the first float that is not finite (or is 0 by underflow)
  in float32, or int outside int32, anywhere in `node` (sections, tuples, dicts)."""
  if hasattr(node, "keys"):
    for key in node.keys():
      check_numbers(node[key], f"{prefix}.{key}")
  elif isinstance(node, (tuple, list)):
    for i, item in enumerate(node):
      check_numbers(item, f"{prefix}[{i}]")
  elif isinstance(node, float) and not (math.isfinite(node) and abs(node) <= FLOAT32_MAX):
    raise ConfigError(f"{prefix}={node!r} must be a finite number (float32: |x| <= "
                      f"{FLOAT32_MAX:.3g}).")
  elif isinstance(node, float) and 0 < abs(node) < FLOAT32_TINY:
    raise ConfigError(f"{prefix}={node!r} is 0 in float32 (|x| < {FLOAT32_TINY:.3g}): give 0 "
                      "or a larger value.")
  elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > INT32_MAX:
    raise ConfigError(f"{prefix}={node!r} is out of range: an integer key must be within "
                      f"+-{INT32_MAX} (int32).")


def check_bytes(config, arrays, limit):
  """Raises ConfigError when one of `arrays`, (what, ((key, power), ...), bytes per element),
  would take more than `limit` bytes: refused by arithmetic before numpy or XLA try."""
  for what, factors, element_bytes in arrays:
    total = element_bytes * math.prod(get(config, key) ** power for key, power in factors)
    if total > limit:
      terms = " x ".join(f"config.{key}={get(config, key)}" + (f"^{power}" if power > 1 else "")
                         for key, power in factors)
      raise ConfigError(f"{terms} x {element_bytes} bytes = {total:.3g} bytes for {what}, over "
                        f"the {limit / 2**40:g} TiB no one machine holds: lower one of them.")
