#!/bin/sh
# The example's science, run inside the container with the slot dir at /app:
# count to the number in in.txt, one step a second, resuming from the checkpoint.
set -e
cd /app
n=$(cat in.txt)
i=0
if [ -f checkpoint.txt ]; then i=$(cat checkpoint.txt); fi
while [ "$i" -lt "$n" ]; do
  sleep 1
  i=$((i + 1))
  echo "$i" > checkpoint.tmp && mv checkpoint.tmp checkpoint.txt
  echo "$i $n" | awk '{ print $1 / $2 }' > fraction_done
done
echo "counted to $n" > out.txt
