#!/usr/bin/env bash
# Build the sal_ros_msgs interfaces and install them into a venv that holds the ROS 2 pip wheels
# (no apt ROS). On a ROS install use colcon instead (docs/ros.md). Idempotent: skipped when the venv already holds
# this exact package (hash of its files + interpreter), FORCE=1 rebuilds.
#   VENV=.venv sal_ros_msgs/build_venv.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$(cd "${VENV:-$HERE/../.venv}" && pwd)"
PY="$VENV/bin/python3"
STAMP="$VENV/share/sal_ros_msgs/build_stamp"
HASH="$( (cd "$HERE" && cat package.xml CMakeLists.txt msg/*.msg build_venv.sh; "$PY" -c 'import sys; print(sys.version)') \
        | sha256sum | cut -d' ' -f1)"
if [[ "${FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]] \
   && "$PY" -c 'import sal_ros_msgs.msg' 2>/dev/null; then
  echo "sal_ros_msgs: up to date in $VENV"
  exit 0
fi
command -v cmake >/dev/null || { echo "sal_ros_msgs: cmake (>= 3.21) is needed" >&2; exit 1; }
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/sal_ros_msgs_build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT
t0=$SECONDS
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"  # else: No 'rosidl_typesupport_c' found
export PATH="$VENV/bin:$PATH"
if ! { cmake -S "$HERE" -B "$BUILD" -DCMAKE_PREFIX_PATH="$VENV" -DCMAKE_INSTALL_PREFIX="$VENV" \
         -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release \
       && cmake --build "$BUILD" -j "${JOBS:-2}" && cmake --install "$BUILD"; } >"$BUILD/log.txt" 2>&1; then
  tail -n 40 "$BUILD/log.txt" >&2
  echo "sal_ros_msgs: build failed (log above)" >&2
  exit 1
fi
"$PY" -c 'from sal_ros_msgs.msg import FrameSummary, Vocabulary, VocabularyClass' \
  || { echo "sal_ros_msgs: installed but does not import" >&2; exit 1; }
mkdir -p "$(dirname "$STAMP")" && echo "$HASH" > "$STAMP"
echo "sal_ros_msgs: built and installed into $VENV in $((SECONDS - t0)) s"
