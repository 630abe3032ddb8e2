"""sal_ros: SAL (Segment Anything in Lidar) for ROS 2.

Layers, imports one way only (docs/architecture.md, checked by test/test_architecture.py): core (numpy) <- model
(torch) <- data <- eval <- pseudolabel <- train <- pretrain <- nodes (rclpy) <- tools <- bench, demo <- cli.
"""

__version__ = "0.1.0"
