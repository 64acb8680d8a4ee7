"""The names of every choice a run makes, each declared once, with what it means.

The modules that implement a choice key their tables by these names (a test checks that
each table covers exactly its names); the configuration, the command line (its
``choices=`` and ``--help``) and the docs read them from here. The estimators have
their own registry, :data:`pyro_vae.objectives.registry.ESTIMATORS`, with more to say
about each. No torch import here: ``pyro-vae --help`` stays fast.
"""

from __future__ import annotations

#: data sets :func:`pyro_vae.data.load_data` knows by name
DATASETS = {
    "digits": "1,797 8x8 handwritten digits (scikit-learn), built in: no download",
    "mnist": "MNIST, 28x28, through torchvision (or IDX files in a folder)",
    "fashion-mnist": "Fashion-MNIST, 28x28, through torchvision",
    "kmnist": "Kuzushiji-MNIST, 28x28, through torchvision",
}
#: how grey levels in [0, 1] become the data the likelihood scores
BINARIZATIONS = {
    "dynamic": "a fresh Bernoulli draw of every training image at every step",
    "static": "one fixed Bernoulli draw per image",
    "none": "the grey levels as they are",
}
#: decoder likelihoods p(x | z)
LIKELIHOODS = {
    "bernoulli": "independent Bernoulli per pixel (binary data)",
    "continuous_bernoulli": "continuous Bernoulli per pixel (grey levels in [0, 1])",
    "gaussian": "independent Gaussian per dimension (fixed or learned scale)",
}
#: hidden-layer nonlinearities of the networks
ACTIVATIONS = {
    "tanh": "tanh (the IWAE paper's)",
    "relu": "ReLU",
    "softplus": "softplus (Pyro's VAE tutorial's)",
    "elu": "ELU",
    "gelu": "GELU",
    "silu": "SiLU",
}
#: network families of encoder and decoder
NETWORKS = {
    "mlp": "multilayer perceptrons (any data shape)",
    "conv": "a small convolutional pair (image data, sides multiples of 4)",
}
#: optimizers
OPTIMIZERS = {
    "adam": "torch.optim.Adam (fused where available)",
    "clipped_adam": "Pyro's ClippedAdam (gradient norm clipped at clip_norm)",
}
#: guides of a hierarchical model
GUIDES = {
    "bottom-up": "q(z1|x) q(z2|z1) ...: the IWAE paper's; the closed-form KL is not exact",
    "top-down": "q(zL|x) ... q(z1|z2, x), ladder-style: the closed-form KL is exact",
}
#: learning-rate schedules, per epoch
LR_SCHEDULES = {
    "constant": "the learning rate throughout",
    "exponential": "multiplied by lr_gamma after every epoch",
    "cosine": "cosine decay to zero over the epochs",
    "iwae": "the IWAE paper's: 1e-3 * 10^(-i/7) for 3^i passes, i = 0..7",
}
#: where AIS chains start (pyro_vae.analysis.ais)
AIS_STARTS = {
    "guide": "q(z|x): the chains start near the posterior, fewer steps needed",
    "prior": "p(z): needs no guide, more steps needed",
}
#: AIS annealing schedules of beta_0 = 0 < ... < beta_T = 1
AIS_SCHEDULES = {
    "sigmoid": "Grosse et al. (2015): finer steps near both ends",
    "linear": "beta_t = t / T",
}
