#!/bin/sh
# Write a BOINC client data dir that runs one task of the example app with no
# project server: a client_state.xml with the project, the app, an app version
# whose main program is the shim, a workunit and a result whose files are all
# present, so the client starts the task at once.
#
# usage: standalone.sh DATA_DIR SHIM_PYZ      (BOINC=/path/to/boinc to ask another client)
set -eu
dir=$1
pyz=$2
here=$(cd "$(dirname "$0")" && pwd)
# The app version's platform must be one the client runs, e.g. x86_64-pc-linux-gnu.
platform=$("${BOINC:-boinc}" --version | awk '{ print $2 }')
# Nothing answers at this URL: the client never reaches a server, and the finished
# result waits in "uploading". The project dir name is the URL with / and : as _.
url=http://127.0.0.1:1/example/
project=$dir/projects/127.0.0.1_1_example
now=$(date +%s)
mkdir -p "$project" "$dir/slots"

# The app version's files and the workunit's input, as a project server would send them.
cp "$pyz" "$project/boincd-shim_0.1.0.pyz"
chmod 755 "$project/boincd-shim_0.1.0.pyz"
cp "$here/job.toml" "$project/count_1.00_job.toml"
cp "$here/count.sh" "$project/count_1.00_count.sh"
echo 5 > "$project/count_wu_1_in.txt"

# A file the client finds present in the project dir (<status>1</status>).
present() {  # NAME [executable]
  echo "<file>"
  echo "    <name>$1</name>"
  echo "    <nbytes>$(wc -c < "$project/$1")</nbytes>"
  echo "    <status>1</status>"
  if [ "${2:-}" = executable ]; then echo "    <executable/>"; fi
  echo "</file>"
}

cat > "$dir/account_127.0.0.1_1_example.xml" <<XML
<account>
    <master_url>$url</master_url>
    <authenticator>none</authenticator>
    <project_name>example</project_name>
</account>
XML
{
cat <<XML
<client_state>
<project>
    <master_url>$url</master_url>
    <project_name>example</project_name>
    <scheduler_url>http://127.0.0.1:1/example_cgi/cgi</scheduler_url>
    <dont_request_more_work/>
    <min_rpc_time>$((now + 365 * 86400))</min_rpc_time>
</project>
<app>
    <name>count</name>
    <user_friendly_name>Count (container example)</user_friendly_name>
</app>
XML
present boincd-shim_0.1.0.pyz executable
present count_1.00_job.toml
present count_1.00_count.sh
present count_wu_1_in.txt
cat <<XML
<app_version>
    <app_name>count</app_name>
    <version_num>100</version_num>
    <platform>$platform</platform>
    <avg_ncpus>1</avg_ncpus>
    <flops>1e9</flops>
    <api_version>7.20.0</api_version>
    <file_ref>
        <file_name>boincd-shim_0.1.0.pyz</file_name>
        <main_program/>
    </file_ref>
    <file_ref>
        <file_name>count_1.00_job.toml</file_name>
        <open_name>job.toml</open_name>
        <copy_file/>
    </file_ref>
    <file_ref>
        <file_name>count_1.00_count.sh</file_name>
        <open_name>count.sh</open_name>
        <copy_file/>
    </file_ref>
</app_version>
<workunit>
    <name>count_wu_1</name>
    <app_name>count</app_name>
    <version_num>100</version_num>
    <rsc_fpops_est>1e10</rsc_fpops_est>
    <rsc_fpops_bound>1e15</rsc_fpops_bound>
    <rsc_memory_bound>268435456</rsc_memory_bound>
    <rsc_disk_bound>1000000000</rsc_disk_bound>
    <file_ref>
        <file_name>count_wu_1_in.txt</file_name>
        <open_name>in.txt</open_name>
        <copy_file/>
    </file_ref>
</workunit>
<file>
    <name>count_wu_1_0_out.txt</name>
    <nbytes>0</nbytes>
    <max_nbytes>1000000</max_nbytes>
    <status>0</status>
    <upload_url>http://127.0.0.1:1/example_cgi/file_upload_handler</upload_url>
</file>
<result>
    <name>count_wu_1_0</name>
    <wu_name>count_wu_1</wu_name>
    <platform>$platform</platform>
    <version_num>100</version_num>
    <state>2</state>
    <received_time>$now</received_time>
    <report_deadline>$((now + 30 * 86400))</report_deadline>
    <file_ref>
        <file_name>count_wu_1_0_out.txt</file_name>
        <open_name>out.txt</open_name>
        <copy_file/>
    </file_ref>
</result>
</client_state>
XML
} > "$dir/client_state.xml"
echo "wrote $dir; the output file will be $project/count_wu_1_0_out.txt"
