r"""The default main job: an alias of protein_performer_softmax_uni (see its docstring).

python train.py --config=configs/default.py --workdir=/tmp/protein_uni
"""

from configs import protein_performer_softmax_uni


def get_config():
  return protein_performer_softmax_uni.get_config()
