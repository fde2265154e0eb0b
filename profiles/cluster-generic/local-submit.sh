#!/usr/bin/env bash
# Stand-in for a scheduler's submit command: `local-submit.sh THREADS MEM_MB RUNTIME JOBSCRIPT`.
# Runs the job script in the background on this machine and prints a job id, as sbatch --parsable does; records
# what each job asked for in .snakemake/local-submit/submitted.tsv.
set -euo pipefail
threads=$1 mem_mb=$2 runtime=$3 jobscript=${!#}
mkdir -p .snakemake/local-submit
id="local-$$-$RANDOM"
printf '%s\t%s\t%s\t%s\t%s\n' "$id" "$threads" "$mem_mb" "$runtime" "$jobscript" >> .snakemake/local-submit/submitted.tsv
nohup bash "$jobscript" > ".snakemake/local-submit/$id.log" 2>&1 < /dev/null &
echo "$id"
