"""Label-free pretraining of lidar backbones by 2D-to-3D distillation (ScaLR, Seal); see sal_ros.pretrain.trainer."""
