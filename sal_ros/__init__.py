"""sal_ros: SAL (Segment Anything in Lidar) for ROS 2.

Layers, imports one way only: core (numpy) <- model (torch) <- data / pseudolabel / train / eval <- nodes (rclpy) <- cli.
"""

__version__ = "0.1.0"
