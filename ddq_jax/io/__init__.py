"""Weights in and out: the weight formats (converted folders, training runs,
mmdetection and torchvision .pth), the fit check, conversion from and to the
reference's names, and result paths written safely."""
