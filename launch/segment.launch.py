"""Launch the SAL segmenter (and optionally the frame recorder) with the shipped parameters.

    ros2 launch sal_ros segment.launch.py [params_file:=my.yaml] [record:=true record_dir:=frames]
                                          [use_sim_time:=true] [log_level:=info] [managed:=true]

managed:=true starts the lifecycle variants (unconfigured; `ros2 lifecycle set /sal_segmenter configure`, then
`activate`). record_dir and use_sim_time win over the params file, its node-scoped sections included.

DDS: the nodes keep the environment's RMW_IMPLEMENTATION, ROS_AUTOMATIC_DISCOVERY_RANGE and Fast DDS profile, so
a lidar driver on another host stays visible. discovery_range:=LOCALHOST and fastdds_profile:=<path> set them for
these nodes only when given, e.g. the installed share/sal_ros/config/fastdds.xml (shared memory for large clouds,
UDP on loopback only).
"""
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration

from ament_index_python.packages import get_package_share_directory
from sal_ros.tools.launch_args import SHARED_ARGUMENTS, sensor_node, shared_arguments

# Arguments handed to record.launch.py when record:=true.
RECORDER_ARGS = ("params_file", "record_dir", *SHARED_ARGUMENTS)


def segmenter(context):
    return sensor_node(context, "sal_segmenter", "segmenter")  # or segmenter_managed (managed:=true)


def generate_launch_description():
    share = get_package_share_directory("sal_ros")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "segment.yaml"),
                              description="ROS 2 params YAML (sections /**, sal_segmenter, sal_recorder)"),
        DeclareLaunchArgument("record", default_value="false", description="also run the frame recorder"),
        DeclareLaunchArgument("record_dir", default_value="",
                              description="recorder FrameStore directory; empty: output_dir of the params file"),
        *shared_arguments("the nodes"),
        OpaqueFunction(function=segmenter),
        # The recorder is record.launch.py itself (one definition of its node), given this launch's arguments.
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(share, "launch", "record.launch.py")),
            launch_arguments={name: LaunchConfiguration(name) for name in RECORDER_ARGS}.items(),
            condition=IfCondition(LaunchConfiguration("record")),
        ),
    ])
