"""The 2-layer `stoker rl` run the tests share (bindings over configs/rl/addition_tiny.gin)."""

TINY = ['model.num_layers = 2', 'model.d_model = 32', 'model.num_heads = 2', 'model.num_kv_heads = 1',
        'model.head_dim = 16', 'model.mlp_dim = 64', 'rl.prompts_per_step = 4', 'rl.group_size = 4',
        'rl.minibatches = 2', 'rl.max_tokens = 4', 'rl.eval_prompts = 8', 'engine.num_pages = 64',
        'engine.max_seqs = 16', 'engine.token_budget = 64', 'engine.min_bucket = 64',
        'optimizer.learning_rate = 1e-2', 'optimizer.warmup_steps = 0', 'checkpoint.every_steps = 0',
        'rl.devices = 1']  # one of the 8 test devices: 8-way data parallelism of a 2-layer model is slower
GIN = 'rl/addition_tiny.gin'
