"""Training: one loop for every task, checkpoints, metrics, sharding, configs.

    from performer import training
    config = training.load_config('configs/tiny.py', ['train.num_steps=20'])
    result = training.train_and_evaluate(config, '/tmp/workdir')

`training.runs` caches finished runs by name for notebooks and scripts (see runs.py).
"""

from performer.training import runs
from performer.training.config_utils import ConfigError, load_config, validate
from performer.training.train_lib import evaluate, train_and_evaluate

__all__ = ['ConfigError', 'evaluate', 'load_config', 'runs', 'train_and_evaluate', 'validate']
