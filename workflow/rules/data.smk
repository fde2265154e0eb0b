rule split:
    output:
        SPLIT_FILES,
    params:
        data=config["data"],
        original=config["original"],
        restricted=config["restricted"],
        split=config["split"],
    log:
        "logs/split.log",
    threads: 1
    shell:
        STAGE.format(stage="split") + " 2> {log}"
