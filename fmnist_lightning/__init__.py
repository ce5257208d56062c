"""fmnist-lightning: the Fashion-MNIST CNN experiment as a PyTorch Lightning tool.

Importing the package is cheap: torch and lightning load only when a module that needs them is
imported (`fmnist_lightning.data`, `.model`, `.training`, ...).
"""

__version__ = "0.1.0"
