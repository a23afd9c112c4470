"""Prompt-template labels (paper Fig. 4b): nouns of a caption as extra text labels.

For each example, k nouns are drawn from its caption and each is put into a
handcrafted template ("a photo of a {}."): k short label texts that the image
should match (`clusjax.losses.prompt_label_loss`). A label text is positive
for every image whose caption has that noun, so on the built-in shapes it is
a supervised signal on the kind of a shape, which contrast over whole
captions barely trains (in-batch captions are told apart by colour, size and
position first).

Noun finding needs no tagger or download: a noun is the head (last word) of
a noun phrase opened by an indefinite article or a number word ("a small red
circle on the left" -> "circle"), the phrase ending at punctuation, a
preposition, a conjunction, a common verb or an -ing word after its first
word ("a man riding" -> "man", "a building" -> "building"). `stop_nouns`
drops nouns that say nothing about the image ("photo", "background").
With `phrases=True` the labels are drawn from the nouns and the whole phrases
after their openers ("circle", "small red circle"), so that they also name
what the modifiers say (colour, size); the paper's labels are the nouns alone.

Nouns are compared by id (`noun_id`, a hash; 0 = none), so the loss needs no
vocabulary of nouns. The draw is `np.random.default_rng([seed, index, 2])`:
example `index` gets the same labels on every read, and a resumed run sees
the same batches.
"""
import functools
import re
import zlib

import numpy as np

from clusjax.config import WORD_PATTERN
from clusjax.config_checks import prompts_on

# Words that open a noun phrase.
OPENERS = frozenset(
    "a an one two three four five six seven eight nine ten some several many".split())
# Words that end one (the head is the word before).
ENDERS = frozenset(
    """on in at of with and or but to by for from into onto over under above below near
    beside behind between next inside outside around along across against through is are
    was were be being been has have had sits sit stands stand lies lie that which who
    while there here""".split())
_TOKEN = re.compile(WORD_PATTERN + r"|[^\sA-Za-z]")


def find_nouns(caption, stop_nouns=(), phrases=False):
  """The nouns of `caption`, in order, each once, lower case, `stop_nouns` dropped.

  With `phrases`, each noun comes with the words before it in its phrase
  ("small red circle"); a phrase is dropped when its noun is a stop noun.
  """
  nouns, phrase = [], None
  for token in _TOKEN.findall(caption.lower()) + ["."]:
    is_word = token[0].isalpha()
    if phrase is not None and (not is_word or token in ENDERS or token in OPENERS
                               or (phrase and token.endswith("ing"))):
      if phrase and phrase[-1] not in stop_nouns:
        nouns.append(" ".join(phrase) if phrases else phrase[-1])
      phrase = None
    if token in OPENERS:
      phrase = []
    elif phrase is not None:
      phrase.append(token)
  return list(dict.fromkeys(nouns))


def caption_tags(caption, stop_nouns=()):
  """The objects a caption names, as one text: its noun phrases joined by ", "
  ("small red circle, large blue square"); SoftCLIP's tags. On the built-in
  shapes, exactly the shapes of the image."""
  return ", ".join(find_nouns(caption, stop_nouns, phrases=True))


def noun_id(noun):
  """A positive int32 id of `noun` (0 is reserved for "no noun")."""
  return zlib.crc32(noun.encode()) % (2**31 - 1) + 1


class PromptLabeler:
  """caption + example index -> k label texts and the noun ids to match them.

  Picklable (plain attributes) for Grain worker processes.
  """

  def __init__(self, templates, num_nouns, max_nouns, max_text_len, stop_nouns=(), seed=0,
               phrases=False):
    self.templates, self.num_nouns, self.max_nouns = tuple(templates), num_nouns, max_nouns
    self.max_text_len = max_text_len   # tokens of a label text
    self.stop_nouns, self.seed, self.phrases = tuple(stop_nouns), seed, phrases

  def __call__(self, caption, index):
    """Returns (texts: list of k str, "" where the caption has fewer nouns;
    label_noun int32 [k], the id of each text's noun, 0 for ""; caption_nouns
    int32 [max_nouns], the ids of the caption's nouns, 0-padded)."""
    nouns = find_nouns(caption, self.stop_nouns)
    if self.phrases:   # and the phrases: "circle", "small red circle", ...
      nouns = list(dict.fromkeys(nouns + find_nouns(caption, self.stop_nouns, phrases=True)))
    nouns = nouns[:self.max_nouns]
    rng = np.random.default_rng([self.seed, index, 2])
    chosen = rng.permutation(len(nouns))[:self.num_nouns]
    texts = [""] * self.num_nouns
    label_noun = np.zeros(self.num_nouns, np.int32)
    for slot, n in enumerate(chosen):
      texts[slot] = self.templates[rng.integers(len(self.templates))].format(nouns[n])
      label_noun[slot] = noun_id(nouns[n])
    caption_nouns = np.zeros(self.max_nouns, np.int32)
    caption_nouns[:len(nouns)] = [noun_id(n) for n in nouns]
    return texts, label_noun, caption_nouns


def labeler_from_config(config):
  """The run's PromptLabeler, or None when prompt labels are off (also for a
  workdir's config from before they existed)."""
  pc = config.get("prompt_labels")
  if pc is None or not prompts_on(config):
    return None
  return PromptLabeler(pc.templates, pc.num_nouns, pc.max_nouns, pc.max_text_len, pc.stop_nouns,
                       config.data.seed, pc.get("phrases", False))



def tagger_from_config(config):
  """caption -> tag text (`caption_tags`) when the run needs tags (SoftCLIP's
  self-similarity from tags), else None. Picklable for Grain workers."""
  itc = config.loss.get("itc")
  if itc is None or itc.kind != "softclip" or itc.softclip.get("self_similarity") != "tags":
    return None
  return functools.partial(caption_tags, stop_nouns=tuple(config.prompt_labels.stop_nouns))
