"""The zoo's networks: each an ``nn.Module`` (the imperative twin) and a ``Model``."""

from .darknet import Darknet, darknet_from_cfg, parse_cfg
from .dcgan import DCGANDiscriminator, DCGANGenerator, dcgan_discriminator, dcgan_generator
from .deeplab import ASPP, DeepLabV3, WSConv2d, deeplabv3
from .densenet import densenet121, densenet121_module, densenet_bc, densenet_bc_module
from .lenet import LeNet, lenet
from .mlp import MLP, mlp
from .regression import LogisticRegression, linear_regression, logistic_regression
from .resnet import resnet18, resnet34, resnet50, resnet_module
from .unet import DoubleConv, UNet, unet
from .vgg import CifarVGG, vgg16, vgg19, vgg_module
from .yolo import YoloV1, yolo_v1

__all__ = [
    "ASPP",
    "MLP",
    "CifarVGG",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "Darknet",
    "DeepLabV3",
    "DoubleConv",
    "LeNet",
    "LogisticRegression",
    "UNet",
    "WSConv2d",
    "YoloV1",
    "darknet_from_cfg",
    "dcgan_discriminator",
    "dcgan_generator",
    "deeplabv3",
    "densenet121",
    "densenet121_module",
    "densenet_bc",
    "densenet_bc_module",
    "lenet",
    "linear_regression",
    "logistic_regression",
    "mlp",
    "parse_cfg",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet_module",
    "unet",
    "vgg16",
    "vgg19",
    "vgg_module",
    "yolo_v1",
]
