module tokenmeter/quotaload

go 1.26
