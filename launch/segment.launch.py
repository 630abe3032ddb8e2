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
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from ament_index_python.packages import get_package_share_directory
from sal_ros.tools.launch_args import executable, node_overrides, when_given

# Arguments handed to record.launch.py when record:=true.
RECORDER_ARGS = ("params_file", "record_dir", "use_sim_time", "log_level", "managed", "discovery_range",
                 "fastdds_profile")


def segmenter(context):
    return [Node(
        package="sal_ros",
        executable=executable(context, "segmenter"),  # or "segmenter_managed" (managed:=true)
        name="sal_segmenter",
        namespace="",  # the node's full name is known: its overrides are node-scoped (node_overrides)
        parameters=[LaunchConfiguration("params_file"), node_overrides(context)],
        ros_arguments=["--log-level", LaunchConfiguration("log_level")],
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description():
    share = get_package_share_directory("sal_ros")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "segment.yaml"),
                              description="ROS 2 params YAML (sections /**, sal_segmenter, sal_recorder)"),
        DeclareLaunchArgument("record", default_value="false", description="also run the frame recorder"),
        DeclareLaunchArgument("record_dir", default_value="",
                              description="recorder FrameStore directory; empty: output_dir of the params file"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error"),
        DeclareLaunchArgument("managed", default_value="false",
                              description="lifecycle nodes, unconfigured at start: ros2 lifecycle set configure, activate"),
        DeclareLaunchArgument("discovery_range", default_value="",
                              description="ROS_AUTOMATIC_DISCOVERY_RANGE for the nodes (LOCALHOST, SUBNET, ...); "
                                          "empty: as in the environment"),
        DeclareLaunchArgument("fastdds_profile", default_value="",
                              description="Fast DDS XML profile for the nodes, e.g. the installed "
                                          "config/fastdds.xml (loopback only); empty: as in the environment"),
        SetEnvironmentVariable("ROS_AUTOMATIC_DISCOVERY_RANGE", LaunchConfiguration("discovery_range"),
                               condition=when_given("discovery_range")),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("fastdds_profile"),
                               condition=when_given("fastdds_profile")),
        OpaqueFunction(function=segmenter),
        # The recorder is record.launch.py itself (one definition of its node), given this launch's arguments.
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(share, "launch", "record.launch.py")),
            launch_arguments={name: LaunchConfiguration(name) for name in RECORDER_ARGS}.items(),
            condition=IfCondition(LaunchConfiguration("record")),
        ),
    ])
