"""Image-text retrieval fine-tuning (paper Fig. 6c): ITC + ITM with global hard
negatives on the target set; evaluated under the COCO / Flickr protocol
(several captions per image, R@1/5/10 both ways and their sum, ITC and ITM re-ranked).

    python launch/main.py --config=configs/retrieval.py:tiny --config.init_from=workdirs/tiny \\
        --workdir=workdirs/retrieval_tiny                             # built-in shapes
    python launch/main.py --config=configs/retrieval.py --config.init_from=<Clus-Base workdir> \\
        --config.data.name=jsonl --config.data.jsonl.train=coco_train.jsonl \\
        --config.data.jsonl.test=coco_test.jsonl ...   # launch/karpathy_to_jsonl.py writes these
"""
from configs import downstream


def get_config(arg=None):
  c = downstream.task_config("retrieval", arg)
  c.loss.itc_weight = 1.0
  c.loss.itm_weight = 1.0
  # The built-in shapes with differently worded captions per image.
  c.data.captions_per_image = 5
  c.eval.evaluators = ("retrieval",)
  c.eval.num_examples = 25_000     # captions: COCO's 5k test images x 5
  c.eval.rerank_k = 16
  # Paper (retrieval): 10 epochs at batch 1,024 (COCO Karpathy train, 566,747
  # pairs: 5,535 steps), 384 px, peak lr 3.5e-5 within the first epoch, weight decay 0.01.
  downstream.table_1(c, image_size=384, batch_size=1_024, num_steps=5_535,
                     learning_rate=3.5e-5, warmup_frac=0.1, weight_decay=0.01,
                     checkpoint_every=500)
  if arg == "tiny":
    _tiny(c)
  return c


def _tiny(c):
  """Fine-tunes the :tiny pre-training on 2 CPU cores in minutes."""
  downstream.tiny(c, batch_size=96, num_steps=200, checkpoint_every=100)
  c.data.captions_per_image = 3
  c.eval.num_examples = 3_000      # 1,000 test images x 3 captions
