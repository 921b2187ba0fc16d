"""furnitype: recognise furniture and home-goods product photos with pretrained convolutional networks."""

__version__ = "0.1.0"
